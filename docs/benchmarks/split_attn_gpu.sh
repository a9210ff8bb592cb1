# Split packed attention (kernels/flash_attn/split.py: documents of >= 4096 tokens through cuDNN,
# the rest through one Triton varlen call) on ONE H100/H200, expected about 3 minutes (worst
# case, every step at its timeout, about 4.5 with the setup):
#  1. its GPU tests (bf16 vs the float64 reference and vs the Triton path; forced dispatch),
#     while the flash kernels the benchmark's tuners try compile in 8 background processes;
#  2. the packed rows of the kernels benchmark (16k and 64k lognormal documents): seqpar_split and
#     seqpar_split_min2048 beside seqpar_triton (today's packed default), torch's varlen flash and
#     Flex's document mask, with the split's max abs difference from the Triton row;
#  3. fresh document lengths at every call (as in training, where every batch packs new ones):
#     split vs Triton fwd+bwd wall time per layer (8 layers per row share its boundaries, as in a
#     step), so that cuDNN's per-shape graph builds and the per-row plans show; long
#     documents run padded to length buckets (split.py's bucket_len), so after every bucket of the
#     row's range is built once (timed), new rows should cost no builds.
# Before "packed" joins kernels/dispatch.py's SPLIT_FASTER: suggest_SPLIT_FASTER == ["packed"]
# here, and step 3's warmed split median not slower than Triton's.
# Device tool, repo root (carry .whl):   bash docs/benchmarks/split_attn_gpu.sh
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
T0=$(date +%s)
WARM=$(mktemp -d)  # not under $OUT: the device tool brings back only a few files
for i in 0 1 2 3 4 5 6 7; do
    timeout 80 python3 -m seqpar.bench kernels --only flash --flash-warm $i 8 \
        --out "$WARM/warm_$i.json" > "$WARM/warm_$i.log" 2>&1 &
done
SEQPAR_FLASH_TUNE=0 timeout 90 python3 -m pytest -q -m gpu tests/test_flash_split.py > "$OUT/split_tests.log" 2>&1
echo "split gpu tests exit $? at $(( $(date +%s) - T0 )) s ($(tail -1 "$OUT/split_tests.log"))"
grep -E "^(FAILED|ERROR)|Error" "$OUT/split_tests.log" | head -8
wait
echo "flash kernels compiled at $(( $(date +%s) - T0 )) s: $(grep -h warmed "$WARM"/warm_*.log | tr '\n' ' ' | cut -c1-300)"

timeout 110 python3 -m seqpar.bench kernels --only flash --flash-dense-lens --flash-packed-lens 16384 65536 \
    --flash-no-ring-step --out "$OUT/split_bench.json" > "$OUT/split_bench.log" 2>&1
echo "bench exit $? at $(( $(date +%s) - T0 )) s"

timeout 100 python3 - > "$OUT/split_fresh.log" 2>&1 <<'EOF'
import statistics, time, torch
from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn.split import bucket_len, buckets_per_octave, flash_attn_split, min_doc_len
from seqpar.kernels.flash_attn.triton import flash_attn_triton
S, H, D, LAYERS = 16384, 32, 128, 8
def rows(seeds, times):
    for seed in seeds:  # a new row (new long-document lengths) every step
        lens = lognormal_lengths(S, seed=seed)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        q, k, v, do = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3) for i in range(4))
        for name, fn in (("triton", flash_attn_triton), ("split", flash_attn_split)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(LAYERS):  # the layers of a step share the boundaries tensor (and its plan)
                fn(q, k, v, cu_seqlens=cu).backward(do)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) * 1e3 / LAYERS)  # ms per layer
        print({"seed": seed, "max_doc": max(lens), "long_docs": sum(n >= min_doc_len() for n in lens),
               **{n: round(t[-1], 2) for n, t in times.items()}}, flush=True)
med = lambda times, skip=0: {n: round(statistics.median(t[skip:]), 2) for n, t in times.items()}  # noqa: E731
cold = {"triton": [], "split": []}
rows(range(1, 25), cold)
# the first row pays compiles and tuning: medians over the others, and over the last 12 (more buckets known)
print({"buckets_per_octave": buckets_per_octave(), "fresh_rows_median_ms": med(cold, 1),
       "fresh_rows_13_24_median_ms": med(cold, 12)})
# every bucket of [min_doc_len, S] built once (what a long run pays once), then new rows again
p = buckets_per_octave()
t = time.perf_counter()
for L in sorted({bucket_len(n, p) for n in range(min_doc_len(), S + 1)}):
    if L <= S:
        x = torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        flash_attn_split(x, x, x, cu_seqlens=torch.tensor([0, L], dtype=torch.int32, device="cuda")).sum().backward()
torch.cuda.synchronize()
print({"warm_all_buckets_s": round(time.perf_counter() - t, 2)})
warm = {"triton": [], "split": []}
rows(range(101, 113), warm)
print({"buckets_per_octave": p, "warmed_fresh_rows_median_ms": med(warm)})
EOF
echo "fresh-lengths step exit $? at $(( $(date +%s) - T0 )) s"

python3 - "$OUT/split_bench.log" "$OUT/split_bench.json" "$OUT/split_fresh.log" <<'EOF' | tee "$OUT/split_summary.txt"
import ast, collections, json, os, sys
def lines(path):
    return open(path).read().splitlines() if os.path.exists(path) else []
bench = lines(sys.argv[1])
rows = [ast.literal_eval(l) for l in bench if l.startswith("{'kernel'") and "'layout'" in l]
diffs = {(d["kernel"], d["S"]): d["vs_triton"] for d in (ast.literal_eval(l) for l in bench if "'vs_triton'" in l)}
by = collections.defaultdict(dict)
for r in rows:
    if "fwdbwd_tflops" in r:
        by[r["S"]][r["kernel"]] = r
for S, ks in sorted(by.items()):
    flex = ks.get("flex_docmask", {}).get("fwdbwd_tflops")
    tri = ks.get("seqpar_triton", {}).get("fwdbwd_tflops")
    print(f"packed {S} (max doc {next(iter(ks.values()))['max_doc']}): flex_docmask {flex}, "
          f"torch_varlen_flash {ks.get('torch_varlen_flash', {}).get('fwdbwd_tflops')} TFLOP/s fwd+bwd (goal 1.3x flex)")
    for k in ("seqpar_triton", "seqpar_split", "seqpar_split_min2048"):
        if k in ks:
            r = ks[k]
            vs = f" = {r['fwdbwd_tflops'] / flex:.3f}x Flex" if flex else ""
            vt = f", {r['fwdbwd_tflops'] / tri:.3f}x Triton" if tri and k != "seqpar_triton" else ""
            print(f"  {k:22} fwd+bwd {r['fwdbwd_tflops']:6.1f}{vs}{vt}  (fwd {r['fwd_tflops']})"
                  + (f"  max|diff| vs triton {diffs[(k, S)]}" if (k, S) in diffs else ""))
for r in rows:
    if "error" in r:
        print(f"  {r['kernel']} {r['S']} error: {r['error'][:150]}")
try:
    print("suggest_SPLIT_FASTER", json.load(open(sys.argv[2]))["flash"]["summary"].get("suggest_SPLIT_FASTER"))
except Exception as e:
    print("no bench JSON:", repr(e)[:120])
fresh = lines(sys.argv[3])
print("fresh lengths:", *[l for l in fresh if "median" in l or "warm_all" in l] or ["no output"], sep="\n  ")
EOF
grep -h "Error" "$OUT/split_fresh.log" | head -3
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
echo "total $(( $(date +%s) - T0 )) s"
