# One GPU (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/lightning_tma_gpu.sh
# Issue 5's lightning flatness (fwd+bwd within 10% from 4k to 256k tokens; the 2026-11-26 H200 run
# read 0.85, 4k rows the fastest): the lightning kernels' chunks through TMA descriptors
# (SEQPAR_TMA=1; off by default for this family, kernels/lightning_attn/triton.py TMA_DEFAULT) against
# pointer loads, each in its own process (fresh tuning), dense rows of 64k tokens and packed lognormal
# rows, fla's chunk_simple_gla (g_gamma) beside each as the bench's anchor. First the GPU tests (bf16
# vs float64) with TMA on. About 4 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
SEQPAR_TMA=1 timeout 90 python3 -m pytest -q -m gpu tests/test_lightning_triton.py > "$OUT/tests_tma.log" 2>&1
echo "lightning gpu tests, TMA on: exit $? ($(tail -1 "$OUT/tests_tma.log"))"
for tma in 0 1; do
    SEQPAR_TMA=$tma SEQPAR_TUNE_CACHE=0 timeout 120 python3 -m seqpar.bench kernels --only lightning \
        --seq-lens 4096 16384 65536 262144 --packed-lens 65536 --reference-max-tokens 0 \
        --out "$OUT/lightning_tma$tma.json" > "$OUT/lightning_tma$tma.log" 2>&1
    echo "TMA=$tma: exit $?"; grep "^seqpar " "$OUT/lightning_tma$tma.log"
done
