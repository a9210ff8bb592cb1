# Two GPUs (device tool, nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/disagg_hiprio_gpu.sh [ROUNDS]
# Issue 10's ping-pong hiding at 128k tokens per GPU with NCCL's streams at high priority
# (TORCH_NCCL_HIGH_PRIORITY=1: its all-to-all blocks take the next free SM before the attention's):
# the first three wlbllm batches (the second holds a 92k-token document whose output transfers
# waited behind long attention kernels, 2026-11-28 27th session calls 1 and 3), default and high
# priority alternating, ROUNDS (2) times; ~70 s a run. Prints per batch and schedule the ms, the
# waits per call, the transfers alone and each rank's waits per phase.
ROUNDS=${1:-2}
TABLE=docs/benchmarks/2026-11-28-gpu-27th/call1/disagg_cost_table.json
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for hp in 0 1; do
    f="$OUT/disagg_128k_hiprio${hp}_r$round.json"
    TORCH_NCCL_HIGH_PRIORITY=$hp timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg \
      --tokens 131072 --mixes wlbllm --batches 3 --parts-batches 3 --cost-table "$TABLE" --out "$f" \
      > "$OUT/log_hiprio${hp}_r$round.txt" 2>&1
    python3 - "$f" "$hp" "$round" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["cases"][0]["rows"]:
    for m in ("disagg", "disagg_no_pingpong", "disagg_single"):
        print(f"hiprio {sys.argv[2]} round {sys.argv[3]} doc {r['max_doc']:6d} {m:18s} {r[m + '_ms']:8.2f} ms"
              f"  waited {r[m + '_waited_ms']:6.2f}  alone {r.get(m + '_comm_only_ms')}  {r[m + '_waited_by_phase']}")
PY
  done
done
