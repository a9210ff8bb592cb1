# Two GPUs (device tool), from the repo root, .whl carried, the commit before in $OLD (a tree of it):
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/ring_send_ab_gpu.sh
# Issue 3: a ring of 2 sending only the K/V rows its peer reads (zigzag causal: rank 0 sends its
# earlier chunk, half its rows; the later one is the sequence's last) against the code before,
# alternating on one machine: first the NCCL ring bf16 against float64 on the new code, then ROUNDS
# (default 2) rounds of `bench ring` at 32k, FA2 and cuDNN with SEQPAR_RING_KEEP_KV=1 and FA2
# without it, new then old each round (torch CP beside the first run). About 6 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
NEW=$PWD
use() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1); }
SEQPAR_FLASH_TUNE=0 timeout 150 python3 -m pytest -q -m gpu tests/test_ring.py -k "bf16_on_nccl" > "$OUT/ring_gpu_tests.log" 2>&1
echo "ring gpu tests exit $? ($(tail -1 "$OUT/ring_gpu_tests.log"))"
bench() {  # name, keep, family, extra args
    local name=$1 keep=$2 family=$3; shift 3
    SEQPAR_RING_KEEP_KV=$keep timeout 120 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring \
        --packed-lens --methods ring --seq-lens 32768 --kernels "$family" --iters 20 --warmup 3 \
        --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? $(python3 "$NEW/docs/benchmarks/ring_summary.py" "$OUT/$name.log")"
}
for round in $(seq 1 "${ROUNDS:-2}"); do
    for ver in new old; do
        dir=$NEW; [ $ver = old ] && dir=$OLD
        use "$dir"
        cp_rows=(); [ "$round$ver" = 1new ] && cp_rows=(allgather)
        (cd "$dir" && bench "${ver}_flash_keep1_r$round" 1 flash --torch-cp-rotate "${cp_rows[@]}"
         bench "${ver}_cudnn_keep1_r$round" 1 cudnn --torch-cp-rotate
         bench "${ver}_flash_keep0_r$round" 0 flash --torch-cp-rotate)
    done
done
use "$NEW"
