# Measured at aaa2001 (the process group's own all-gather method, reverted after call 6: ~10 us a post, no gain).
# Two GPUs (device tool), from the new code's root, .whl carried, the old code in $OLD:
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/lasp_gather_ab_gpu.sh
# Issue 4 (twenty-fourth session): LASP-2's all-gather posted by the process group's method (new) against
# torch.distributed's function (old). 1. host us per post, both ways, with NCCL's flight recorder and
# without (allgather_host_gpu.py); 2. the GPU tests of LASP-2 and sequence parallelism on NCCL (new code);
# 3. `bench lasp` at 64k, --rounds 3: old, new, old, new.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
NEW=$(pwd)
install() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
timeout 60 torchrun --standalone --nproc_per_node 2 docs/benchmarks/allgather_host_gpu.py "$OUT/allgather.json" \
    > "$OUT/allgather.log" 2>&1; echo "allgather: exit $?"; tail -1 "$OUT/allgather.log"
TORCH_NCCL_TRACE_BUFFER_SIZE=0 timeout 60 torchrun --standalone --nproc_per_node 2 docs/benchmarks/allgather_host_gpu.py \
    "$OUT/allgather_no_trace.json" > "$OUT/allgather_no_trace.log" 2>&1; echo "allgather no trace: exit $?"
tail -1 "$OUT/allgather_no_trace.log"
timeout 150 python3 -m pytest -q -m gpu tests/test_lasp.py tests/test_gpu.py -k "nccl" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"; tail -2 "$OUT/gpu_tests.log"
bench() {  # name, code folder
    install "$2"
    (cd "$2" && timeout 100 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 \
        --methods lasp2 --rounds 3 --iters 20 --warmup 5 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
    echo "$1: exit $?"
    grep -E "lasp2|err" "$OUT/$1.log" | grep -v Warning | tail -2 | cut -c1-300
}
bench lasp_old_r1 "$OLD"; bench lasp_new_r1 "$NEW"; bench lasp_old_r2 "$OLD"; bench lasp_new_r2 "$NEW"
install "$NEW"
