# One H100 (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/split_short_bwd_gpu.sh
# Issue 5 (and 10), about 6 minutes: the split's short documents' backward on FlashAttention-2
# (SEQPAR_SPLIT_SHORT_BWD=flash) against seqpar's Triton kernel (the default). On llama_1b's heads
# FA2's backward ran packed 16k rows 25% faster than Triton's (2026-11-28 call 2, piece_kernels.json).
# 1. the split's GPU tests (bf16 against float64, both families; FA2 then takes the Triton call's
#    pieces without queries or keys);
# 2. `bench kernels --only flash` on packed lognormal rows of 16k and 64k (H=32, D=128; FlexAttention with
#    a document mask in the same run, issue 5's 1.3x), each family twice, alternating.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
SEQPAR_FLASH_TUNE=0 timeout 300 python3 -m pytest -q -m gpu tests/test_flash_split.py -k "split_bf16" \
    > "$OUT/gpu_tests_split.log" 2>&1
echo "split gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests_split.log"))"
for round in 1 2; do
    for fam in triton flash; do
        SEQPAR_SPLIT_SHORT_BWD=$fam timeout 240 python3 -m seqpar.bench kernels --only flash --flash-dense-lens \
            --flash-packed-lens 16384 65536 --flash-no-ring-step --flash-profile 16384 \
            --out "$OUT/split_${fam}_r$round.json" > "$OUT/split_${fam}_r$round.log" 2>&1
        echo "round $round $fam: exit $?"
        python3 - "$OUT/split_${fam}_r$round.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["rows"]:
    print("   ", r.get("layout"), r.get("S"), r.get("kernel") or r.get("impl") or r.get("name"),
          {k: v for k, v in r.items() if "tflops" in k or k.endswith("_ms")})
PY
    done
done
