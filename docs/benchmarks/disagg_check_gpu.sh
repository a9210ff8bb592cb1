# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/disagg_check_gpu.sh
# Issue 10's goals checked in one go, under 5 minutes, every step under a timeout:
# 1. the disagg GPU tests (bf16 on NCCL against fp32);
# 2. the benchmark at 128k tokens per GPU, wlbllm and prolong, 4 batches, the first 2 also timed
#    as compute alone (the same call with its all-to-alls skipped) and transfers alone (its
#    all-to-alls replayed), so hidden_fraction = (compute + comm - whole) / comm is meaningful;
# 3. the wlbllm case profiled (docs/benchmarks/profile_gpu.py): batch 1 (case 5 onward) is the one
#    whose plan moves work; its server calls should all be Triton (_attn_fwd/_attn_bwd_*), no
#    FA2 (flash_fwd/flash_bwd kernels) and no host sync between them (untuned kernels, to keep it
#    short: the profile shows which kernels and copies run, the timings are the benchmark's).
# Prints per mix: each method against the balanced ideal, compute alone against the ideal (the
# runtime's loss without transfers), the hidden fraction of the transfers, the kernels used, and
# each rank's timeline of one call on the first batch that moved work (when each nano-batch's
# transfer was ready and its kernel done, in ms since the call began).
mkdir -p "$OUT"
SEQPAR_FLASH_TUNE=0 timeout 100 python3 -m pytest -q -m gpu tests/test_disagg.py 2>&1 | tail -4
timeout 170 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg --mixes wlbllm prolong --tokens 131072 \
  --batches 4 --parts-batches 2 --out "$OUT/disagg_check_128k.json" 2>&1 | grep -v Warning | tail -2 | cut -c1-300
SEQPAR_FLASH_TUNE=0 timeout 90 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT/profile" disagg \
  --mixes wlbllm --tokens 131072 --batches 2 --parts-batches 0 --iters 1 --warmup 1 \
  --out "$OUT/disagg_profiled.json" 2>&1 | grep -v Warning | tail -1 | cut -c1-300
gzip -f "$OUT"/profile/profile_rank*.txt 2>/dev/null
timeout 30 python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
f = out / "disagg_check_128k.json"
if not f.is_file():
    sys.exit("no benchmark JSON: see the lines above")
res = json.loads(f.read_text())
print("device", res["device"], "| server kernels", res.get("server_kernels"))
fmt = lambda x, n=1: "-" if x is None else f"{x:.{n}f}"
for c in res["cases"]:
    s = c["summary"]
    print(f"{c['mix']} {c['tokens_per_rank']}/GPU, {c['batches']} batches: imbalance {s['imbalance_before']:.3f} -> "
          f"{s['imbalance_after']:.3f}; ms (x ideal {s['balanced_ideal_ms']:.1f}): no rebalancing "
          f"{s['dp_no_rebalance_ms']:.1f} ({s['dp_no_rebalance_vs_ideal']}), disagg ping-pong {s['disagg_ms']:.1f} "
          f"({s['disagg_vs_ideal']}), disagg default {s['disagg_no_pingpong_ms']:.1f} "
          f"({s['disagg_no_pingpong_vs_ideal']}), per-doc CP {s['per_doc_cp_ms']:.1f} ({s['per_doc_cp_vs_ideal']}), "
          f"ring {s['ring_ms']:.1f} ({s['ring_vs_ideal']}); goal disagg <= 1.03")
    for m in ("disagg", "disagg_no_pingpong"):
        if f"{m}_parts_batches" in s:
            print(f"   {m}: over {s[m + '_parts_batches']} batches that moved work: whole {s[m + '_parts_ms']:.1f}, "
                  f"ideal {s[m + '_parts_ideal_ms']:.1f}, compute alone {s[m + '_compute_only_ms']:.1f} "
                  f"({s[m + '_compute_only_vs_ideal']} x ideal), comm alone {s[m + '_comm_only_ms']:.2f}, "
                  f"exposed {s[m + '_exposed_comm_ms']:.2f}, hidden fraction {fmt(s[m + '_hidden_fraction'], 3)} "
                  f"(goal >= 0.9), waited per call {fmt(s.get(m + '_waited_ms'), 2)}")
    for r in c["rows"]:
        print(f"   batch: docs {r['n_docs']:3d} max {r['max_doc']:6d} imbalance {r['imbalance_before']:.3f} "
              f"ideal {r['balanced_ideal_ms']:.1f} pp {r['disagg_ms']:.1f} (compute {fmt(r.get('disagg_compute_only_ms'))}"
              f", comm {fmt(r.get('disagg_comm_only_ms'), 2)}, calls {r.get('disagg_server_calls')}) default "
              f"{r['disagg_no_pingpong_ms']:.1f} (compute {fmt(r.get('disagg_no_pingpong_compute_only_ms'))}, comm "
              f"{fmt(r.get('disagg_no_pingpong_comm_only_ms'), 2)}) per-doc {r['per_doc_cp_ms']:.1f}")
    moved = [r for r in c["rows"] if r.get("disagg_timeline") and r["disagg_bytes"] > 0][:1]
    for r in moved:  # where each rank's time went in one call: ms since the call began, per mark
        for m in ("disagg", "disagg_no_pingpong"):
            for rank, marks in enumerate(r.get(f"{m}_timeline") or []):
                print(f"   timeline {m} rank {rank}: " + " ".join(f"{label.replace(' ', ':')} {ms:.1f}"
                                                                   for label, ms in marks))
PY
for r in 0 1; do
  echo "--- profile rank $r (cases: per batch dp, disagg, disagg default, ring, per-doc CP)"
  zcat "$OUT/profile/profile_rank$r.txt.gz" 2>/dev/null | grep -E "^=====|_attn_fwd |_attn_bwd_d|flash_fwd|flash_bwd|aten::cat |aten::copy_ |cudaDeviceSynchronize|cudaStreamSynchronize|aten::item|_local_scalar" \
    | awk '/^=====/{n++} n>5' | cut -c1-60,160-260 | head -40
done
