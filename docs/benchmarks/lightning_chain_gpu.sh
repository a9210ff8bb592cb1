# One GPU (device tool; on a 2-GPU machine it uses GPU 0), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/lightning_chain_gpu.sh     (~6-8 minutes)
# Issue 5's flatness: the chained output pass (SEQPAR_LIGHTNING_CHAIN=1, d6df634) first checked (the CUDA tests run
# every case with and without it, bf16 and fp16 against float64), then timed against the default, alternating.
# A hang would be the chain's tickets or flags: the timeouts bound it.
[ -n "${SEQPAR_GPU_READY:-}" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
SEQPAR_FLASH_TUNE=0 timeout 240 python3 -m pytest -q -m gpu tests/test_lightning_triton.py > "$OUT/tests.log" 2>&1
echo "tests exit $?"; tail -3 "$OUT/tests.log"
timeout 300 python3 docs/benchmarks/lightning_chain_gpu.py "$OUT/lightning_chain.json" 16x4096 4x16384 65536 262144 \
  > "$OUT/lightning_chain.log" 2>&1
echo "A/B exit $?"; tail -2 "$OUT/lightning_chain.log"
