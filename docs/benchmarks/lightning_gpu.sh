# One GPU (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/lightning_gpu.sh
# Issue 5's lightning goal (fwd+bwd >= 11 Mtok/s, H=32, D=128, flat within 10% from 4k to 256k
# tokens) with fla's chunk_simple_gla (g_gamma) in the same run: `bench kernels --only lightning`,
# dense rows of 64k tokens (B = 64k / S) and packed lognormal rows. About 4 minutes (fla compiles per shape).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
timeout 330 python3 -m seqpar.bench kernels --only lightning --out "$OUT/lightning.json" > "$OUT/lightning.log" 2>&1
echo "exit $?"; tail -20 "$OUT/lightning.log"
