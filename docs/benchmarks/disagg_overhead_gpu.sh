# Two GPUs (device tool, kind nvidia-h100-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/disagg_overhead_gpu.sh
# The disagg runtime's own cost over local attention (issue 10), about 5 minutes, every step under
# a timeout: the bf16 NCCL checks of disagg, the benchmark at 128k tokens per GPU (wlbllm and
# prolong, 4 batches, 2 with compute/comm alone), then the wlbllm case profiled as in
# docs/benchmarks/2026-11-26-2xh100-profile/ (compare case 1 there: index_put/index_add/gather
# should be gone, disagg_ms on a batch that moves nothing should match dp_no_rebalance_ms).
mkdir -p "$OUT"
SEQPAR_FLASH_TUNE=0 timeout 120 python3 -m pytest -q -m gpu tests/test_disagg.py 2>&1 | tail -5
timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg --mixes wlbllm prolong --tokens 131072 \
  --batches 4 --parts-batches 2 --out "$OUT/disagg_overhead_128k.json" 2>&1 | grep -v Warning | tail -3
timeout 100 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT/profile" disagg \
  --mixes wlbllm --tokens 131072 --batches 1 --parts-batches 1 --out "$OUT/disagg_profiled.json" 2>&1 | grep -v Warning | tail -2
gzip -f "$OUT"/profile/profile_rank*.txt 2>/dev/null
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
f = out / "disagg_overhead_128k.json"
if f.is_file():
    for c in json.loads(f.read_text())["cases"]:
        s = c["summary"]
        print(f"{c['mix']:8s} imbalance {s['imbalance_before']:.3f}->{s['imbalance_after']:.3f}  dp {s['dp_no_rebalance_ms']:.1f}"
              f" ideal {s['balanced_ideal_ms']:.1f} disagg {s['disagg_ms']:.1f} (no pp {s['disagg_no_pingpong_ms']:.1f},"
              f" compute alone {s.get('disagg_compute_only_ms')}, comm alone {s.get('disagg_comm_only_ms')})"
              f" ring {s['ring_ms']:.1f} per-doc {s['per_doc_cp_ms']:.1f}  disagg/ideal {s['disagg_vs_ideal']}")
        for r in c["rows"]:
            print(f"   batch: bytes {r['disagg_bytes']:>12d} imbalance {r['imbalance_before']:.3f} dp {r['dp_no_rebalance_ms']:.1f}"
                  f" ideal {r['balanced_ideal_ms']:.1f} disagg {r['disagg_ms']:.1f} no-pp {r['disagg_no_pingpong_ms']:.1f}")
PY
for r in 0; do
  zcat "$OUT/profile/profile_rank$r.txt.gz" 2>/dev/null | grep -E "^=====|index_put|index_add|aten::gather|aten::cat |aten::copy_ " | head -30
done
