# Two GPUs (device tool), from the repo root, .whl carried, the commit before in $OLD (a tree of it):
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/ring_send_more_gpu.sh
# Issue 3, after ring_send_ab_gpu.sh: the trimmed K/V shift of a ring of 2 at 128k (FA2 and cuDNN,
# without keep, torch CP beside), then one more round at 32k, FA2 with and without keep, new then
# old. About 5 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
NEW=$PWD
use() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . > /dev/null 2>&1); }
bench() {  # name, keep, S, family, extra args
    local name=$1 keep=$2 S=$3 family=$4; shift 4
    SEQPAR_RING_KEEP_KV=$keep timeout 200 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring \
        --packed-lens --methods ring --seq-lens "$S" --kernels "$family" --warmup 3 \
        --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name: exit $? $(python3 "$NEW/docs/benchmarks/ring_summary.py" "$OUT/$name.log")"
}
use "$NEW"
bench new_128k_flash_keep0 0 131072 flash --iters 5 --torch-cp-rotate allgather
bench new_128k_cudnn_keep0 0 131072 cudnn --iters 5 --torch-cp-rotate allgather
for ver in new old; do
    dir=$NEW; [ $ver = old ] && dir=$OLD
    use "$dir"
    (cd "$dir" && bench "${ver}_flash_keep1_r3" 1 32768 flash --iters 20 --torch-cp-rotate
     bench "${ver}_flash_keep0_r3" 0 32768 flash --iters 20 --torch-cp-rotate)
done
use "$NEW"
