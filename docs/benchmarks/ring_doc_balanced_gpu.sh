# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/ring_doc_balanced_gpu.sh
# Layout doc_balanced (issue 3's packed goal, efficiency >= 0.90): the GPU tests of test_ring (bf16
# ring vs fp64 on NCCL for zigzag, doc_zigzag and doc_balanced, and no host synchronisation in a
# second layer's fwd+bwd), then bench ring on the packed cases only (64k and 128k, the lognormal mix:
# zigzag, doc_zigzag and doc_balanced per kernel family), one line per family. About 2-3 minutes,
# under 4 with every step's timeout.
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -m gpu tests/test_ring.py 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
timeout 110 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --seq-lens --packed-lens 65536 131072 \
  --out "$OUT/ring_packed.json" 2>&1 | grep -v Warning | grep '^{' > "$OUT/ring_packed.log"
python3 - "$OUT/ring_packed.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["packed"]
except (OSError, ValueError) as e:
    sys.exit(f"no bench result: {e}")
for row in rows:
    for family, r in row.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            print(f"S={row['S']} {family}: {r['error']}")
            continue
        extra = "".join(f" {k}={r[k]}" for k in ("compute_only_ms", "exposed_comm_ms", "cut_docs", "travel_rows") if k in r)
        print(f"S={row['S']} docs={row['n_docs']} {family:<20} efficiency={r['efficiency']:.3f} ring_ms={r['ring_ms']:.2f} "
              f"single_ms={r['single_ms']:.2f} work_imbalance={r['work_imbalance']} calls={r['calls_per_rank']} "
              f"rows={r['local_rows']}{extra} max_abs_diff={r.get('max_abs_diff_vs_single')}")
PY
