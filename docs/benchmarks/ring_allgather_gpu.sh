# Two GPUs (device tool, kind nvidia-h200-x2: issue 3's device), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/ring_allgather_gpu.sh
# Issue 3 at 32k, about 5 minutes, every step under a timeout:
# 1. the all-gather's forward split at a range's own rows (e1a8f31, CPU-tested only when written):
#    bf16 against float64 on NCCL, with the ring's cases (`pytest -m gpu tests/test_ring.py -k nccl`);
# 2. the ring bench with the all-gather beside the ring and torch's context_parallel, 32k and 128k
#    (efficiency against one GPU of the same family; the all-gather's calls run FA2 in both);
# 3. where the time goes (profile_gpu.py: per-rank kernel tables per timed case) at 32k: the cuDNN
#    ring, whose kernels sum to less than half the one-GPU call (2026-11-27-gpu-16th/call2's probe)
#    while the ring runs 0.89, and the all-gather (FA2), which idled ~2.7 ms before the split.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT/profile"
timeout 120 python3 -m pytest -q -m gpu tests/test_ring.py -k nccl > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
timeout 240 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --seq-lens 32768 131072 --packed-lens \
    --methods ring allgather --iters 10 --warmup 3 --out "$OUT/ring_allgather.json" > "$OUT/ring_allgather.log" 2>&1
echo "bench: exit $?"
grep "^{" "$OUT/ring_allgather.log" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print(d['S'], d['kernel'], 'ring', d.get('efficiency'), 'all-gather', d.get('allgather_efficiency'),
          'torch CP', d.get('torch_cp_allgather_efficiency'), d.get('torch_cp_alltoall_efficiency'), d.get('error', ''))"
for kernel in cudnn flash; do
    timeout 90 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT/profile/$kernel" ring \
        --packed-lens --seq-lens 32768 --kernels $kernel --methods ring allgather --iters 5 --warmup 2 \
        --torch-cp-rotate --out "$OUT/profile/$kernel/ring.json" 2>&1 | grep "^{" | tail -1
    grep "=====" "$OUT/profile/$kernel/profile_rank0.txt"
    gzip -f "$OUT/profile/$kernel"/profile_rank*.txt
done
