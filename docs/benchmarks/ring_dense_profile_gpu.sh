# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/ring_dense_profile_gpu.sh
# Issue 3's dense cases (32k and 128k, H=32, D=128, beside torch's context_parallel) with each
# timed case also profiled once (profile_gpu.py: per-rank kernel tables, the figures unprofiled).
# About 2 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
timeout 240 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT" ring --packed-lens \
    --seq-lens 32768 131072 --iters 5 --warmup 2 --out "$OUT/ring_dense.json" 2>&1 | grep -v Warning | tail -8
gzip -f "$OUT"/profile_rank*.txt
