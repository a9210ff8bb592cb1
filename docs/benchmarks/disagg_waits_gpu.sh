# Two GPUs (device tool, kind nvidia-h100-x2 / nvidia-h200-x2), repo root, .whl carried:
#   bash docs/benchmarks/disagg_waits_gpu.sh [SEQ]            (default 65536; about 8 minutes)
# Issue 10: what the end-to-end disagg lane's backward waits are (eighth session: 187-258 ms per
# step at 64k, single waits of 35-44 ms, gone when every server call runs on Triton).
# 1. dp2_disagg_dp_cp with step 8 of 8 profiled WITHOUT the CPU ops (logging.profile_cpu_ops=false:
#    the step keeps its own timeline) and each rank's trace read by trace_gaps.py: how long its GPU
#    stood still, and whether for the host (the next kernel launched late: e.g. a cuDNN plan build)
#    or for a collective (the other rank late);
# 2. the lanes dp2, ideal_1gpu and dp2_disagg_dp_cp with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch's
#    experimental ragged path for dense cuDNN attention: one plan per power-of-two length instead of
#    one per bucket; docs/benchmarks/cudnn_shapes.py counts 25 / 36 new shapes per rank in steps
#    3-12 without it, 2 / 7 with it), to set beside the same lanes without it (earlier calls, or
#    LANES_PLAIN=1 here to run them too when the time allows).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT/timeline" "$OUT/norecompile"
SEQ=${1:-65536}
STEPS=8 LANES="dp2_disagg_dp_cp" EXTRA="logging.profile_step=8 logging.profile_trace=true logging.profile_cpu_ops=false" \
    OUT="$OUT/timeline" bash docs/benchmarks/disagg_dp_cp_gpu.sh "$SEQ" 2>&1 | grep -v Warn | tail -1 | cut -c1-600
for rank in 0 1; do
    trace=/tmp/dp_cp/dp2_disagg_dp_cp/profile/step8_rank$rank.json
    [ -f "$trace" ] && timeout 120 python3 docs/benchmarks/trace_gaps.py "$trace" "$OUT/timeline/gaps_rank$rank.json" \
        | head -12 | cut -c1-300
    cp /tmp/dp_cp/dp2_disagg_dp_cp/profile/step8_rank$rank.txt "$OUT/timeline/" 2>/dev/null
done
TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 STEPS=10 LANES="dp2 ideal_1gpu dp2_disagg_dp_cp" EXTRA=" " OUT="$OUT/norecompile" \
    bash docs/benchmarks/disagg_dp_cp_gpu.sh "$SEQ" 2>&1 | grep -v Warn | tail -5 | cut -c1-900
grep -h "AVOID_RECOMPILE" "$OUT"/norecompile/*.log | sort | uniq -c | head -3  # torch's warning: the path was taken
if [ -n "${LANES_PLAIN:-}" ]; then
    mkdir -p "$OUT/plain"
    STEPS=10 LANES="dp2 ideal_1gpu dp2_disagg_dp_cp" EXTRA=" " OUT="$OUT/plain" \
        bash docs/benchmarks/disagg_dp_cp_gpu.sh "$SEQ" 2>&1 | grep -v Warn | tail -5 | cut -c1-900
fi
