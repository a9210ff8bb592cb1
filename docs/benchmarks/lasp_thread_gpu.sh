# Measured at 9ff6146 (bench lasp's backward in the calling thread; reverted after call 5: no measurable gain).
# Two GPUs (device tool), .whl carried: source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/lasp_thread_gpu.sh
# Issue 4 (twenty-fourth session). 1. the LASP-2 bf16 GPU test (its host-sync check fixed); 2. the host cost of
# posting the states' all-gather, through torch.distributed's function and the process group's method, with
# NCCL's flight recorder and without (allgather_host_gpu.py); 3. `bench lasp` (backward in the calling thread,
# the new default) at 64k and 256k, --rounds 3, twice, and at 64k with --engine-threads (torch's default).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
timeout 150 python3 -m pytest -q -m gpu tests/test_lasp.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"; tail -2 "$OUT/gpu_tests.log"
timeout 60 torchrun --standalone --nproc_per_node 2 docs/benchmarks/allgather_host_gpu.py "$OUT/allgather.json" \
    > "$OUT/allgather.log" 2>&1; echo "allgather: exit $?"; tail -1 "$OUT/allgather.log"
TORCH_NCCL_TRACE_BUFFER_SIZE=0 timeout 60 torchrun --standalone --nproc_per_node 2 docs/benchmarks/allgather_host_gpu.py \
    "$OUT/allgather_no_trace.json" > "$OUT/allgather_no_trace.log" 2>&1; echo "allgather no trace: exit $?"
tail -1 "$OUT/allgather_no_trace.log"
bench() {  # name, extra flags
    timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens $TOKENS --methods lasp2 \
        --rounds 3 --iters 20 --warmup 5 $2 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1
    echo "$1: exit $?"
    grep -E "lasp2|err" "$OUT/$1.log" | grep -v Warning | tail -3 | cut -c1-300
}
TOKENS="65536 262144" bench lasp_r1; TOKENS=65536 bench lasp_engine_threads --engine-threads; TOKENS="65536 262144" bench lasp_r2
