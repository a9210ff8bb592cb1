# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/ring_gpu.sh
# Ring attention (issue 3), at most 5 minutes, every step under a timeout: the GPU tests of
# test_ring (aten lse paths, bf16 ring vs fp64 on NCCL incl. doc_zigzag with padded documents), then
# the packed-documents benchmark (lognormal mix, 64k and 128k: zigzag over the row vs doc_zigzag,
# efficiency and per-rank work imbalance) and the dense benchmark beside torch's context_parallel
# (fewer iterations: the same-run baseline, not this script's subject).
# Each bench row is printed as it finishes, so a timeout still leaves the finished rows in the log.
mkdir -p "$OUT"
timeout 90 python3 -m pytest -q -m gpu tests/test_ring.py 2>&1 | tail -6
timeout 110 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --seq-lens --out "$OUT/ring_packed.json" \
  2>&1 | grep -v Warning | tail -3 > "$OUT/ring_packed.log"
timeout 100 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --packed-lens --iters 5 --warmup 2 \
  --out "$OUT/ring_dense.json" \
  2>&1 | grep -v Warning | tail -5
python3 - "$OUT" <<'PY'
import json, sys, pathlib
f = pathlib.Path(sys.argv[1]) / "ring_packed.json"
if not f.exists():
    print("no ring_packed.json; last rows:"); print((f.parent / "ring_packed.log").read_text()[-3000:]); sys.exit()
for row in json.loads(f.read_text())["packed"]:
    for fam in ("cudnn", "flash"):
        for key in (fam, f"{fam}_doc_zigzag"):
            r = row.get(key, {})
            print(f"S={row['S'] // 1024}k docs={row['n_docs']} {key:17s}", "error: " + r["error"] if "error" in r else
                  f"eff {r.get('efficiency')} work_imb {r.get('work_imbalance')} time_imb {r.get('time_imbalance')} "
                  f"ring {r.get('ring_ms', 0):.2f} ms single {r.get('single_ms', 0):.2f} ms calls {r.get('calls_per_rank')}"
                  + (f" exposed {r.get('exposed_comm_ms')} ms diff {r.get('max_abs_diff_vs_single'):.3g}"
                     if "exposed_comm_ms" in r else ""))
PY
