# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/profile_bench_gpu.sh ring|lasp
# A two-GPU benchmark with each timed case also profiled once (profile_gpu.py: per-rank kernel
# tables; the figures stay the unprofiled ones). ring: issue 3's dense cases, 32k and 128k, H=32,
# D=128, beside torch's context_parallel; lasp: LASP-2 (and LASP-1) at 64k and 256k (issue 4).
# About 2 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
case ${1:?ring or lasp} in
  ring) args="--packed-lens --seq-lens 32768 131072 --iters 5 --warmup 2" ;;
  lasp) args="--tokens 65536 262144 --methods lasp2,lasp1" ;;
esac
# shellcheck disable=SC2086
timeout 240 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT" "$1" $args \
    --out "$OUT/$1.json" 2>&1 | grep -v Warning | tail -8
gzip -f "$OUT"/profile_rank*.txt
