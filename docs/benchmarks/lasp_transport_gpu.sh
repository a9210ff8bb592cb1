# Measured at a062348 (the copy transport of the states, reverted after this measurement: slower).
# Two GPUs (device tool), .whl carried: source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/lasp_transport_gpu.sh
# Issue 4 (twenty-fourth session): LASP-2's state all-gather by the copy engines (SEQPAR_STATE_TRANSPORT=copy,
# copy_engine.all_gather) against NCCL's, on one machine. 1. GPU tests: LASP-2 bf16 on the Triton kernel
# against float64 over both transports (and no host sync in a layer's second call), every sequence-parallel
# method in fp64 over NCCL with both, the ring over both (copy_engine was refactored); 2. LASP-2's host by
# piece with the copy engines; 3. `bench lasp` at 64k and 256k, --rounds 3, nccl, copy, nccl, copy.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
SEQPAR_FLASH_TUNE=0 timeout 240 python3 -m pytest -q -m gpu tests/test_lasp.py tests/test_gpu.py tests/test_ring.py \
    -k "nccl" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?"; grep -E "passed|failed|^FAILED|Error" "$OUT/gpu_tests.log" | head -12
SEQPAR_STATE_TRANSPORT=copy timeout 100 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host_parts_gpu.py \
    "$OUT/host_parts_copy.json" 32768 > "$OUT/host_parts_copy.log" 2>&1
echo "host parts copy: exit $?"; grep "host" "$OUT/host_parts_copy.log" | grep -v Warn | cut -c1-200
bench() {  # name, transport
    SEQPAR_STATE_TRANSPORT=$2 timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp \
        --tokens 65536 262144 --methods lasp2 --rounds 3 --iters 20 --warmup 5 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1
    echo "$1: exit $?"
    grep -E "lasp2|err" "$OUT/$1.log" | grep -v Warning | tail -3 | cut -c1-300
}
bench lasp_nccl_r1 nccl; bench lasp_copy_r1 copy; bench lasp_nccl_r2 nccl; bench lasp_copy_r2 copy
