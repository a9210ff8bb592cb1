# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/disagg_gpu.sh
# Core-attention disaggregation (issue 10), at most 8 minutes (every step under a timeout; the bench
# writes each case as it finishes): the bf16 NCCL check, the per-task cost table on one GPU, then the
# benchmark (disagg's three schedules vs ring vs per-document CP vs no rebalancing, timed in rounds) at 64k and 128k
# tokens per GPU on the wlbllm / prolong / lognormal mixes.
# `bash docs/benchmarks/disagg_gpu.sh split` (pairs_gpu.sh: "disagg_gpu.sh:split") runs it all with
# SEQPAR_ATTN_KERNEL=split: the servers' calls (lse-returning, task boundaries) on the split too,
# their long square tasks through cuDNN, as the data-parallel rows' packed calls are by default
# (kernels/dispatch.py SPLIT_FASTER "packed_lse", not measured yet).
# `disagg_gpu.sh prefix` (SEQPAR_CUDNN_PREFIX=1): the servers' long pieces over a causal prefix
# on cuDNN (split.prefix_parts: the default from 2026-11-26's sixth session to 2026-11-27), for the A/B.
[ "${1:-}" = split ] && export SEQPAR_ATTN_KERNEL=split
[ "${1:-}" = prefix ] && export SEQPAR_CUDNN_PREFIX=1
mkdir -p "$OUT"
SEQPAR_FLASH_TUNE=0 timeout 90 python3 -m pytest -q -m gpu tests/test_disagg.py 2>&1 | tail -5
SEQPAR_FLASH_TUNE=0 timeout 60 python3 -m pytest -q -m gpu tests/test_flash_split.py -k task 2>&1 | tail -3
timeout 45 python3 -m seqpar.bench disagg --profile-cost-table "$OUT/disagg_cost_table.json" 2>&1 | tail -3
TABLE=()  # plan with the fitted per-task overhead when the profile produced one
python3 -c "import json,sys; sys.exit(json.load(open('$OUT/disagg_cost_table.json'))['fitted_task_overhead_pairs'] is None)" \
  2>/dev/null && TABLE=(--cost-table "$OUT/disagg_cost_table.json") && echo "planning with ${TABLE[1]}"
timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg --tokens 65536 "${TABLE[@]}" \
  --out "$OUT/disagg_2gpu_64k.json" 2>&1 | grep -v Warning | tail -4
timeout 180 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg --tokens 131072 --mixes wlbllm prolong \
  --batches 16 "${TABLE[@]}" --out "$OUT/disagg_2gpu_128k.json" 2>&1 | grep -v Warning | tail -3
python3 - "$OUT" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("disagg_2gpu_*.json")):
    for c in json.loads(f.read_text())["cases"]:
        s = c["summary"]
        print(f"{c['mix']:9s} {c['tokens_per_rank']:6d}/gpu  imbalance {s['imbalance_before']:.3f}->{s['imbalance_after']:.3f}"
              f"  vs ideal: disagg {s['disagg_vs_ideal']} (no pp {s['disagg_no_pingpong_vs_ideal']}, single {s.get('disagg_single_vs_ideal')})"
              f" ring {s['ring_vs_ideal']}"
              f" per-doc {s['per_doc_cp_vs_ideal']} dp {s['dp_no_rebalance_vs_ideal']}  hidden {s.get('disagg_hidden_fraction')}")
PY
