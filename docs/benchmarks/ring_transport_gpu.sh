# Two GPUs (device tool), from the repo root, .whl carried, the code before ce206fa beside it in
# .snap_old (git archive 523dc18):
#   source docs/benchmarks/gpu_setup.sh && PART=1 OUT=DIR bash docs/benchmarks/ring_transport_gpu.sh
#   source docs/benchmarks/gpu_setup.sh && PART=2 OLD=.snap_old OUT=DIR bash docs/benchmarks/ring_transport_gpu.sh
# Issue 3, two calls of about 6 and 3 minutes (part 1: steps 1-3; part 2: steps 4-5), every step under a timeout:
# 1. does a transfer beside cuDNN attention cost it less on the copy engines than through NCCL's
#    kernels (ce_contention_probe_gpu.py, one process, both GPUs, ~1 minute);
# 2. GPU tests: the ring bf16 against float64 on NCCL with NCCL's transfers and with the copy
#    engines' (SEQPAR_RING_TRANSPORT=copy); again with the FA2 family forced (the backward's prefix
#    calls, ce206fa); which families get the prefix calls;
# 3. the ring bench at 32k with each transport (ring only, torch CP beside the first);
# 4. the FA2 ring at 32k at the code before ce206fa (.snap_old: its backward's own blocks as a
#    rectangle and a diagonal), then the new again;
# 5. the copy-engine cuDNN ring's profile at 32k (are the attention kernels as fast as alone?).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT/profile"
NEW=$PWD
bench() {  # name, transport, extra args
    local name=$1 transport=$2; shift 2
    SEQPAR_RING_TRANSPORT=$transport timeout 200 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring \
        --packed-lens --methods ring --iters 10 --warmup 3 --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name ($transport): exit $?"
    python3 "$NEW/docs/benchmarks/ring_summary.py" "$OUT/$name.log"
}
if [ "${PART:-1}" = 1 ]; then
timeout 120 python3 docs/benchmarks/ce_contention_probe_gpu.py "$OUT/ce_probe.json" > "$OUT/ce_probe.log" 2>&1
echo "probe: exit $?"; grep -A4 '"attention_ms"\|"transfer_ms"' "$OUT/ce_probe.log"
timeout 240 python3 -m pytest -q -m gpu tests/test_ring.py -k "nccl or prefix_calls" > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
# the FA2 family forced: the backward's prefix calls (auto dispatch keeps the two dense calls)
SEQPAR_ATTN_KERNEL=flash timeout 150 python3 -m pytest -q -m gpu tests/test_ring.py -k "bf16_on_nccl and not copy" \
    > "$OUT/gpu_tests_flash.log" 2>&1
echo "gpu tests, FA2 family: exit $? ($(tail -1 "$OUT/gpu_tests_flash.log"))"
bench ring_nccl nccl --seq-lens 32768
bench ring_copy copy --seq-lens 32768 --torch-cp-rotate
exit 0
fi
cd "$OLD" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && cd "$NEW"
(cd "$OLD" && bench ring_old_flash_32k nccl --seq-lens 32768 --kernels flash --torch-cp-rotate)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
bench ring_new_flash_32k nccl --seq-lens 32768 --kernels flash --torch-cp-rotate
SEQPAR_RING_TRANSPORT=copy timeout 90 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py \
    "$OUT/profile" ring --packed-lens --seq-lens 32768 --kernels cudnn --methods ring --iters 5 --warmup 2 \
    --torch-cp-rotate --out "$OUT/profile/ring_copy.json" 2>&1 | grep "^{" | tail -1
grep "=====" "$OUT/profile/profile_rank0.txt"
gzip -f "$OUT/profile"/profile_rank*.txt
