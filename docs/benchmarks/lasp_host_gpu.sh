# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/lasp_host_gpu.sh
# Issue 4 at 64k tokens on 2 GPUs: whether LASP-2's step is bound by the host (lasp_host.py:
# 50-step means, host enqueue time, rank 0's cProfile), then the LASP benchmark at 64k and 256k
# with 20 timed steps (its default 5 are one host hiccup from a different figure). About 2 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
timeout 120 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host.py "$OUT" 32768 \
    > "$OUT/lasp_host.log" 2>&1
echo "lasp_host exit $?"; grep -v Warning "$OUT/lasp_host.log" | head -70
timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 262144 \
    --methods lasp2,lasp2_zigzag,lasp1 --iters 20 --warmup 5 --out "$OUT/lasp.json" 2>&1 | grep -v Warning | tail -8
