# Two GPUs (device tool, kind nvidia-h100-x2 / nvidia-h200-x2), repo root, .whl carried:
#   bash docs/benchmarks/disagg_waits_gpu.sh MODE [SEQ]      (SEQ default 65536)
# Issue 10: what the end-to-end disagg lane's waits are. MODE:
# - timeline (~2 min): lane LANE (default dp2_disagg_dp_cp) with step PSTEP (default 8) of PSTEP profiled WITHOUT the CPU ops
#   (logging.profile_cpu_ops=false: the step keeps its own timeline), each rank's trace read by
#   trace_gaps.py: how long its GPU stood still, and whether for the host (the next kernel launched
#   late: a cuDNN plan build) or for a collective (the other rank late). Ninth session: 546 ms of
#   host stalls per step before the plans were prebuilt on the autograd thread, 40-97 ms after;
# - norecompile (~6 min): the lanes dp2, ideal_1gpu and dp2_disagg_dp_cp with
#   TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 (torch's experimental ragged path for dense cuDNN attention:
#   one plan per power-of-two length). Ninth session (torch 2.11): loss NaN at step 2 in dp2;
# - noprebuild (~6 min): the same lanes with train.cudnn_prebuild=false (each bucket's plans built
#   inside the step that first meets it);
# - plain (~6 min): the same lanes as they run by default (plans prebuilt, disagg's planner told
#   which tasks run on cuDNN), to set beside the others in one call;
# - dpideal (~7 min): dp2, dp2_disagg_dp_cp and dp2_as0, dp2_as1 (both ranks read rank 0's / 1's
#   rows): the issue's balanced ideal, the mean of the ranks' own step times, data parallelism's
#   cost in it; 18 steps (the issue averages at least 16). Tenth session (2 H100): disagg 1.080x it;
#   eleventh (2 H200, the servers' prefix pieces on Triton): 1.050x;
# - schedules (~8 min): dp2_as0, dp2_as1 and disagg over dp_cp with the halves and ping_pong
#   schedules at eps 0.02 (what is left past 1.050x: ~60 ms a step of exposed waits, imbalance 1.035);
#   `STEPS=18 LANES="dp2_disagg_eps05 dp2_disagg_eps02" EXTRA=" " bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536`
#   beside it (disagg_phases.py models both directions' imbalance 1.040 at eps 0.1, 1.025 at 0.05, 1.017 at 0.02;
#   twelfth session, 2 H100: eps 0.05 1.060x, eps 0.02 1.053x the ideal);
# - apart (~8 min): dp2_as0, dp2_as1 and disagg with parallel.disagg.plans=per_direction at eps 0.02 and
#   0.1 (each direction planned for its own Triton speed: modelled forward imbalance 1.048 -> 1.007 at
#   eps 0.02, where the steps' ratios followed the forward's imbalance).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
MODE=${1:?timeline, norecompile, noprebuild, plain, dpideal, schedules or apart}
SEQ=${2:-65536}
mkdir -p "$OUT/$MODE"
lanes() {  # EXTRA, LANES (default: the three lanes), STEPS (default 10)
    STEPS=${STEPS:-10} LANES=${LANES:-"dp2 ideal_1gpu dp2_disagg_dp_cp"} OUT="$OUT/$MODE" bash docs/benchmarks/disagg_dp_cp_gpu.sh "$SEQ" \
        2>&1 | grep -v Warn | tail -9 | cut -c1-900
    grep -o '"startup_s": [0-9.]*' "$OUT/$MODE"/*_metrics.jsonl
}
case $MODE in
  timeline)
    P=${PSTEP:-8}
    L=${LANE:-dp2_disagg_dp_cp}
    STEPS=$P LANES="$L" EXTRA="logging.profile_step=$P logging.profile_trace=true logging.profile_cpu_ops=false" \
        OUT="$OUT/$MODE" bash docs/benchmarks/disagg_dp_cp_gpu.sh "$SEQ" 2>&1 | grep -v Warn | tail -1 | cut -c1-600
    for rank in 0 1; do
        trace=/tmp/dp_cp/$L/profile/step${P}_rank$rank.json
        [ -f "$trace" ] && timeout 120 python3 docs/benchmarks/trace_gaps.py "$trace" "$OUT/$MODE/gaps_rank$rank.json" \
            > "$OUT/$MODE/gaps_rank$rank.txt" 2>&1  # whole (a pipe into head cut it short)
        head -12 "$OUT/$MODE/gaps_rank$rank.txt" | cut -c1-300
        cp /tmp/dp_cp/$L/profile/step${P}_rank$rank.txt "$OUT/$MODE/" 2>/dev/null
    done ;;
  norecompile)
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 EXTRA=" " lanes
    grep -h "AVOID_RECOMPILE" "$OUT/$MODE"/*.log | sort | uniq -c | head -3 ;;  # torch's warning: the path was taken
  noprebuild) EXTRA="train.cudnn_prebuild=false" lanes ;;
  plain) EXTRA=" " lanes ;;
  dpideal) EXTRA=" " STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_dp_cp dp2" lanes ;;
  schedules) EXTRA=" " STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_halves_eps02 dp2_disagg_ping_pong_eps02" lanes ;;
  apart) EXTRA=" " STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_apart_eps02 dp2_disagg_apart" lanes ;;
  *) echo "MODE: timeline, norecompile, noprebuild, plain, dpideal, schedules or apart" >&2; exit 2 ;;
esac
