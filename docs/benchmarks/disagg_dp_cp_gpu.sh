# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/disagg_dp_cp_gpu.sh [SEQ]
# Disaggregation across data-parallel ranks (parallel.disagg.group=dp_cp), at most 7 minutes:
# 1. the bf16 NCCL check: each GPU its own packed row (rank 0 one 8k document, rank 1 32 short
#    ones), disagg over both against fp32 attention of the row alone;
# 2. llama_1b, SEQ (default 16k; above it selective checkpointing) tokens per GPU of lognormal
#    documents (mean SEQ / 4), the same batches (two rows per step) in every lane: plain data
#    parallelism (dp2: each rank attends its own row), disagg over dp_cp, ring CP (cp2: each row
#    zigzag over both GPUs), per-document CP (cp2, doc_zigzag: every document cut into head/tail
#    pairs, ring), and the balanced ideal: one GPU running both rows, its step time halved (the
#    two ranks' mean work with free communication); mean step time of steps 3..STEPS (12; 8 above
#    16k) and the modelled attention imbalance before/after planning. LANES picks a subset; A/B
#    lanes of disagg: dp2_disagg_prefix (SEQPAR_CUDNN_PREFIX=1: the servers' prefix pieces on
#    cuDNN, since 716cea5 in chunks of prebuilt shapes; _eps02: and eps 0.02; _halves_eps02: and the
#    halves schedule, whose cut of the local work makes a piece over a prefix; dp2_disagg_noprefix:
#    =0, the default since 2026-11-27), dp2_disagg_shared_group
#    (SEQPAR_DISAGG_SHARED_GROUP=1: its all-to-alls on FSDP's communicator, as before 2026-11-26 7th),
#    dp2_disagg_eps05 (parallel.disagg.eps=0.05: rows within 10% of balance, which the default leaves
#    alone, balanced too; dp2_disagg_eps02: 0.02), dp2_disagg_tc105 (parallel.disagg.triton_cost=1.05:
#    a Triton pair weighed as 1.05 cuDNN pairs: 1.079x, worse; dp2_disagg_tcNNN_eps02: weighed 1.NN, eps 0.02), dp2_disagg_apart
#    (parallel.disagg.plans=per_direction: each direction planned for its own Triton speed; _eps02: and
#    eps 0.02), dp2_disagg_halves and dp2_disagg_ping_pong (parallel.disagg.schedule: the
#    local work around the transfers, the transfers of one nano-batch under another's compute; _eps02:
#    and eps 0.02);
#    dp2_fixed and ideal_1gpu_fixed: every document SEQ / 4 long (balanced rows), so dp2_fixed over
#    the halved ideal_1gpu_fixed is plain data parallelism's cost apart from any imbalance;
#    dp2_as0 and dp2_as1: plain dp with both ranks reading rank 0's (1's) rows (data.read_as_rank),
#    so the mean of the two is the issue's balanced ideal, "the mean of the ranks' unbalanced step
#    times", with data parallelism's own cost in it (ideal_1gpu has none).
# Disagg lanes also report rank 0's exposed waits by phase (fwd_in, fwd_out, bwd_in, bwd_out), its
# longest single wait and the spread of the exposed time over the ranks (max, min); every lane the
# CUDA allocator's retries since the start (alloc_retries: each one a device-wide stall).
# CPU smoke form (mechanics only):
#   OUT=/tmp/o MODEL=tiny_hybrid SEQ=512 EXTRA="train.device=cpu" bash docs/benchmarks/disagg_dp_cp_gpu.sh
mkdir -p "$OUT"
SEQ=${1:-${SEQ:-16384}}
STEPS=${STEPS:-$((SEQ > 16384 ? 8 : 12))}
CKPT=$([ "$SEQ" -gt 16384 ] && echo selective || echo none)
if [ -z "${EXTRA:-}" ]; then
  SEQPAR_FLASH_TUNE=0 timeout 120 python3 -m pytest -q -m gpu tests/test_disagg.py -k across_ranks 2>&1 | tail -5
fi
# MIX=wlbllm|prolong: DistCA's length mixes (docs/benchmarks/data) instead of the lognormal documents;
# name the OUT folder ..._disagg_dp_cp_gpu_<MIX>_<SEQ> (the simulator reads the mix from it)
case ${MIX:-lognormal} in
  lognormal) DOCS="data.distribution=lognormal data.mean_len=$((SEQ / 4)) data.sigma=1.0" ;;
  wlbllm|prolong) DOCS="data.distribution=file data.lengths_file=$PWD/docs/benchmarks/data/$MIX.json.gz" ;;
  *) echo "MIX=$MIX: lognormal, wlbllm or prolong" >&2; exit 2 ;;
esac
COMMON="model=${MODEL:-llama_1b} parallel=none data=synthetic data.seq_len=$SEQ $DOCS train=long train.steps=$STEPS train.warmup_steps=1
  train.activation_checkpointing=$CKPT train.global_batch_size=2 train.micro_batch_size=1 launcher.nproc_per_node=2 logging.console=false ${EXTRA:-}"
disagg="parallel.softmax_sp=disagg parallel.disagg.group=dp_cp"
for name in ${LANES:-dp2 ideal_1gpu dp2_disagg_dp_cp cp2_ring cp2_per_doc}; do
  envs=""
  case $name in
    dp2) extra="" ;;
    dp2_disagg_dp_cp) extra=$disagg ;;
    dp2_disagg_noprefix) extra=$disagg envs="SEQPAR_CUDNN_PREFIX=0" ;;
    dp2_disagg_prefix) extra=$disagg envs="SEQPAR_CUDNN_PREFIX=1" ;;
    dp2_disagg_prefix_eps02) extra="$disagg parallel.disagg.eps=0.02" envs="SEQPAR_CUDNN_PREFIX=1" ;;
    dp2_disagg_prefix_halves_eps02) extra="$disagg parallel.disagg.schedule=halves parallel.disagg.eps=0.02"
      envs="SEQPAR_CUDNN_PREFIX=1" ;;
    dp2_disagg_shared_group) extra=$disagg envs="SEQPAR_DISAGG_SHARED_GROUP=1" ;;
    dp2_disagg_eps05) extra="$disagg parallel.disagg.eps=0.05" ;;
    dp2_disagg_eps02) extra="$disagg parallel.disagg.eps=0.02" ;;
    dp2_disagg_apart) extra="$disagg parallel.disagg.plans=per_direction" ;;
    dp2_disagg_apart_eps02) extra="$disagg parallel.disagg.plans=per_direction parallel.disagg.eps=0.02" ;;
    dp2_disagg_tc105) extra="$disagg parallel.disagg.triton_cost=1.05" ;;
    dp2_disagg_tc1[0-9]*_eps02) tc=${name#dp2_disagg_tc}; tc=${tc%_eps02}
      extra="$disagg parallel.disagg.triton_cost=1.${tc#1} parallel.disagg.eps=0.02" ;;
    dp2_disagg_halves) extra="$disagg parallel.disagg.schedule=halves" ;;
    dp2_disagg_ping_pong) extra="$disagg parallel.disagg.schedule=ping_pong" ;;
    dp2_disagg_halves_eps02) extra="$disagg parallel.disagg.schedule=halves parallel.disagg.eps=0.02" ;;
    dp2_disagg_ping_pong_eps02) extra="$disagg parallel.disagg.schedule=ping_pong parallel.disagg.eps=0.02" ;;
    dp2_disagg_local_remote_eps02) extra="$disagg parallel.disagg.schedule=local_remote parallel.disagg.eps=0.02" ;;
    cp2_ring) extra="parallel.cp=2 parallel.softmax_sp=ring parallel.layout=zigzag" ;;
    cp2_per_doc) extra="parallel.cp=2 parallel.softmax_sp=ring parallel.layout=doc_zigzag" ;;
    ideal_1gpu) extra="launcher.nproc_per_node=1" ;;
    dp2_fixed) extra="data.distribution=fixed" ;;
    dp2_as0|dp2_as1) extra="data.read_as_rank=${name#dp2_as}" ;;
    ideal_1gpu_fixed) extra="launcher.nproc_per_node=1 data.distribution=fixed" ;;
  esac
  rm -rf "/tmp/dp_cp/$name"
  # shellcheck disable=SC2086
  env $envs timeout 150 seqpar-train $COMMON $extra run_dir=/tmp/dp_cp/$name > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; tail -2 "$OUT/$name.log"
  [ -f "/tmp/dp_cp/$name/metrics.jsonl" ] && cp "/tmp/dp_cp/$name/metrics.jsonl" "$OUT/${name}_metrics.jsonl"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out, rows = pathlib.Path(sys.argv[1]), {}
for f in sorted(out.glob("*_metrics.jsonl")):
    name = f.name.removesuffix("_metrics.jsonl")
    ms = [json.loads(line) for line in f.read_text().splitlines()][2:]
    mean = lambda k: sum(m.get(k, 0) for m in ms) / max(1, len(ms))
    rows[name] = {"step_times_s": [m["step_time_s"] for m in ms], "step_time_s": mean("step_time_s"), "tokens_per_s": mean("tokens_per_s"), "loss_last": ms[-1]["loss"],
                  "imbalance_before": mean("sp/attn_imbalance_before"), "imbalance_after": mean("sp/attn_imbalance_after"),
                  "exposed_comm_ms": mean("sp/exposed_comm_ms"), "bytes_moved": mean("sp/bytes_moved"), "steps": len(ms),
                  "alloc_retries": ms[-1].get("alloc_retries"),
                  **{k[3:]: mean(k) for k in ms[0] if k.startswith("sp/exposed_") and k != "sp/exposed_comm_ms"}}
    print(name, json.dumps(rows[name]))
for suffix in ("", "_fixed"):  # one GPU did both rows: half its step is the two ranks' balanced share
    if "ideal_1gpu" + suffix not in rows:
        continue
    ideal = rows["ideal_1gpu" + suffix]["step_time_s"] / 2
    for name, r in rows.items():
        if not name.startswith("ideal_1gpu") and name.endswith("_fixed") == bool(suffix):
            r["x_balanced_ideal"] = round(r["step_time_s"] / ideal, 4)
            print(f"{name}: {r['x_balanced_ideal']:.3f}x the balanced ideal ({ideal * 1e3:.1f} ms)")
if "dp2_as0" in rows and "dp2_as1" in rows:  # the ranks' mean step time had each held its own row's work on both
    ideal = (rows["dp2_as0"]["step_time_s"] + rows["dp2_as1"]["step_time_s"]) / 2
    for name, r in rows.items():
        if not name.startswith(("ideal_1gpu", "dp2_as")) and not name.endswith("_fixed"):
            r["x_dp_ideal"] = round(r["step_time_s"] / ideal, 4)
            print(f"{name}: {r['x_dp_ideal']:.3f}x the mean of the ranks' own step times ({ideal * 1e3:.1f} ms)")
if "dp2" in rows and "dp2_disagg_dp_cp" in rows:
    print(f"dp_cp speedup over plain dp: {rows['dp2']['step_time_s'] / rows['dp2_disagg_dp_cp']['step_time_s']:.3f}x")
(out / "disagg_dp_cp.json").write_text(json.dumps(rows, indent=1) + "\n")
PY
