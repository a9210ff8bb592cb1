# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && [PART=2] OUT=DIR bash docs/benchmarks/ring_keep_gpu.sh
# Issue 3, two calls of about 5 minutes: a ring of 2 keeping the peer's K/V for the backward
# (SEQPAR_RING_KEEP_KV=1: no K/V shift in the backward, the own shard's backward as one call);
# part 1: 1. the NCCL ring bf16 against float64 with it (and the FA2 family forced);
#         2. the ring bench at 32k without and with it, on one machine (torch CP beside the first);
#         3. the ring bench at 128k with it;
# part 2: the 32k bench three times each way, alternating (how far one run's figure is from the
#         next), then with the copy engines' transport (SEQPAR_RING_TRANSPORT=copy) as well;
# part 3: the 32k keep ring, each family, with and without TORCH_NCCL_HIGH_PRIORITY=1 (NCCL's
#         streams at high priority: its send/receive blocks take the next free SM before the
#         attention's), alternating three rounds, then the FA2 keep ring profiled both ways.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
bash docs/benchmarks/device_info.sh "$OUT"  # which pair: the 32k figure depends on it (call 7)
bench() {  # name, keep (0|1), extra args
    local name=$1 keep=$2; shift 2
    SEQPAR_RING_KEEP_KV=$keep timeout 240 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring \
        --packed-lens --methods ring --iters 10 --warmup 3 --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name (keep $keep): exit $?"
    python3 docs/benchmarks/ring_summary.py "$OUT/$name.log"
}
if [ "${PART:-1}" = 3 ]; then
    for round in 1 2 3; do
        cp_rows=(); [ $round = 1 ] && cp_rows=(allgather)  # torch CP once, as the anchor of the call
        for hp in 0 1; do
            for family in flash cudnn; do
                TORCH_NCCL_HIGH_PRIORITY=$hp bench ring_keep_${family}_hiprio${hp}_r$round 1 --seq-lens 32768 \
                    --kernels $family --iters 20 --torch-cp-rotate "${cp_rows[@]}"
            done
        done
    done
    for hp in 0 1; do
        SEQPAR_RING_KEEP_KV=1 TORCH_NCCL_HIGH_PRIORITY=$hp timeout 200 torchrun --standalone --nproc_per_node 2 \
            docs/benchmarks/profile_gpu.py "$OUT/profile_hiprio$hp" ring --packed-lens --seq-lens 32768 \
            --kernels flash --methods ring --torch-cp-rotate --iters 5 --out "$OUT/profile_hiprio$hp/ring.json" \
            > "$OUT/profile_hiprio$hp.log" 2>&1
        echo "profile hiprio $hp: exit $?"
    done
    exit 0
fi
if [ "${PART:-1}" = 2 ]; then
    for round in 1 2 3; do
        bench ring_32k_r$round 0 --seq-lens 32768 --torch-cp-rotate
        bench ring_keep_32k_r$round 1 --seq-lens 32768 --torch-cp-rotate
    done
    SEQPAR_RING_TRANSPORT=copy bench ring_keep_copy_32k 1 --seq-lens 32768 --torch-cp-rotate
    exit 0
fi
SEQPAR_RING_KEEP_KV=1 timeout 150 python3 -m pytest -q -m gpu tests/test_ring.py -k "bf16_on_nccl and not copy" \
    > "$OUT/gpu_tests_keep.log" 2>&1
echo "gpu tests, keep: exit $? ($(tail -1 "$OUT/gpu_tests_keep.log"))"
SEQPAR_RING_KEEP_KV=1 SEQPAR_ATTN_KERNEL=flash timeout 100 python3 -m pytest -q -m gpu tests/test_ring.py \
    -k "bf16_on_nccl and not copy" > "$OUT/gpu_tests_keep_flash.log" 2>&1
echo "gpu tests, keep, FA2 family: exit $? ($(tail -1 "$OUT/gpu_tests_keep_flash.log"))"
bench ring_32k 0 --seq-lens 32768
bench ring_keep_32k 1 --seq-lens 32768 --torch-cp-rotate
bench ring_keep_128k 1 --seq-lens 131072 --torch-cp-rotate
