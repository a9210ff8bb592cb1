# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/ring_triton_gpu.sh
# Issue 3, about 6 minutes: the ring with seqpar's own Triton flash kernel as its local kernel
# (SEQPAR_ATTN_KERNEL=triton; 416 TFLOP/s causal fwd+bwd at 16k on one H100 against FA2's 323), its
# efficiency against the Triton kernel on one GPU over the whole sequence:
# 1. the NCCL ring bf16 against float64 on that family, without and with SEQPAR_RING_KEEP_KV=1;
# 2. the ring bench at 32k and 128k, families triton, flash, cudnn (torch CP beside the last two);
# 3. the 32k bench with the peer's K/V kept, triton and flash alternating, two rounds.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
bash docs/benchmarks/device_info.sh "$OUT"
for keep in 0 1; do
    SEQPAR_RING_KEEP_KV=$keep timeout 150 python3 -m pytest -q -m gpu tests/test_ring.py -k "bf16_on_nccl and triton" \
        > "$OUT/gpu_tests_triton_keep$keep.log" 2>&1
    echo "gpu tests, triton family, keep $keep: exit $? ($(tail -1 "$OUT/gpu_tests_triton_keep$keep.log"))"
done
bench() {  # name, keep (0|1), extra args
    local name=$1 keep=$2; shift 2
    SEQPAR_RING_KEEP_KV=$keep timeout 240 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring \
        --packed-lens --methods ring --warmup 3 --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
    echo "$name (keep $keep): exit $?"
    python3 docs/benchmarks/ring_summary.py "$OUT/$name.log"
}
bench ring_families 0 --seq-lens 32768 131072 --kernels triton flash cudnn --iters 10 --torch-cp-rotate allgather
for round in 1 2; do
    for family in triton flash; do
        bench ring_keep_${family}_32k_r$round 1 --seq-lens 32768 --kernels $family --iters 20 --torch-cp-rotate
    done
done
