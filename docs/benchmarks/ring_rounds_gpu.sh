# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/ring_rounds_gpu.sh
# Issues 3 and 4, about 8 minutes:
# 1. the ring at 32k timed in rounds (`bench ring --rounds 3`: one GPU, ring, compute-only and torch CP
#    once per round, the medians), FA2 and cuDNN, without and with SEQPAR_RING_KEEP_KV=1;
# 2. a profile of the cuDNN ring keeping the peer's K/V at 32k (where its 2-3 ms over half the
#    one-GPU call go; the nineteenth session profiled FA2's);
# 3. a profile of LASP-2 at 64k and 1M against the lightning kernel on one GPU and on half the tokens.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
run2() { timeout "$1" torchrun --standalone --nproc_per_node 2 "${@:2}"; }
for keep in 0 1; do
    SEQPAR_RING_KEEP_KV=$keep run2 300 -m seqpar.bench ring --seq-lens 32768 --packed-lens --methods ring \
        --kernels flash cudnn --rounds 3 --iters 10 --warmup 3 --torch-cp-rotate allgather \
        --out "$OUT/ring_rounds_keep$keep.json" > "$OUT/ring_rounds_keep$keep.log" 2>&1
    echo "ring rounds keep $keep: exit $?"
    python3 docs/benchmarks/ring_summary.py "$OUT/ring_rounds_keep$keep.log"
done
SEQPAR_RING_KEEP_KV=1 run2 150 docs/benchmarks/profile_gpu.py "$OUT/profile_ring_cudnn_keep" ring --seq-lens 32768 \
    --packed-lens --methods ring --kernels cudnn --iters 5 --warmup 2 --torch-cp-rotate \
    --out "$OUT/profile_ring_cudnn_keep/bench.json" > "$OUT/profile_ring_cudnn_keep.log" 2>&1
echo "ring cudnn keep profile: exit $?"
run2 200 docs/benchmarks/profile_gpu.py "$OUT/profile_lasp" lasp --tokens 65536 1048576 --methods lasp2 \
    --iters 5 --warmup 2 --out "$OUT/profile_lasp/bench.json" > "$OUT/profile_lasp.log" 2>&1
echo "lasp profile: exit $?"
grep -h "=====" "$OUT"/profile_*/profile_rank0.txt | cut -c1-200
