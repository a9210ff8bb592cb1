# Two GPUs (device tool), from the repo root, .whl carried, the code before the change beside it in
# .snap_old (git archive of the commit before):
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/ring_trios_gpu.sh
# Issue 3: the ring's gradient folds through kernels.block_sum_ (ba5602e: a row of three results
# summed in one Triton pass; every other gradient sum a vectorised pass) against the code before
# (per rank 3 addcmul into fp32 at ~0.2 ms and 3 mixed-dtype adds at ~0.13 ms, 2026-11-27-gpu-17th/call1).
# 1. GPU tests: block_sum_'s kernel, the NCCL ring (bf16 against float64);
# 2. the ring bench, new code, 32k and 128k, ring and all-gather beside torch's context_parallel;
# 3. the old code at 32k (ring, all-gather), then the new again at 32k (drift between runs);
# 4. the new cuDNN ring's profile at 32k.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT/profile"
NEW=$PWD
bench() {  # name, extra args
    local name=$1; shift
    timeout 240 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --packed-lens --methods ring allgather \
        --iters 10 --warmup 3 --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $?"
    python3 "$NEW/docs/benchmarks/ring_summary.py" "$OUT/$name.log"
}
timeout 150 python3 -m pytest -q -m gpu tests/test_block_sum.py tests/test_ring.py -k "nccl or cuda_triton" \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
bench ring_new --seq-lens 32768 131072
cd "$OLD" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && cd "$NEW"
(cd "$OLD" && bench ring_old_32k --seq-lens 32768 --torch-cp-rotate)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
bench ring_new_32k --seq-lens 32768 --torch-cp-rotate
timeout 90 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT/profile" ring \
    --packed-lens --seq-lens 32768 --kernels cudnn --methods ring --iters 5 --warmup 2 \
    --torch-cp-rotate --out "$OUT/profile/ring.json" 2>&1 | grep "^{" | tail -1
grep "=====" "$OUT/profile/profile_rank0.txt"
gzip -f "$OUT/profile"/profile_rank*.txt
