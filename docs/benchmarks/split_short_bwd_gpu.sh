# A record: SEQPAR_SPLIT_SHORT_BWD existed from f64a9a0 to 8596805 (measured no faster, removed); this
# ran at f64a9a0 / 6070991 (2026-11-28-gpu-21st calls 3-4). At later code both families run Triton's backward.
# One H100 (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && [PART=2] OUT=DIR bash docs/benchmarks/split_short_bwd_gpu.sh
# Issue 5 (and 10), about 6 minutes: the split's short documents' backward on FlashAttention-2
# (SEQPAR_SPLIT_SHORT_BWD=flash) against seqpar's Triton kernel (the default). On llama_1b's heads
# FA2's backward ran packed 16k rows 25% faster than Triton's (2026-11-28 call 2, piece_kernels.json).
# 1. the split's GPU tests (bf16 against float64, both families; FA2 then takes the Triton call's
#    pieces without queries or keys);
# 2. `bench kernels --only flash` on packed lognormal rows of 16k and 64k (H=32, D=128; FlexAttention with
#    a document mask in the same run, issue 5's 1.3x), each family twice, alternating.
# PART=2 (about 8 minutes): `split_short_bwd_heads_gpu.py` (the split alone at 32/8 x 64 and 32 x 128),
# then llama_1b on one GPU, 64k tokens of lognormal documents, 10 steps, each family twice, alternating.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
if [ "${PART:-1}" = 2 ]; then
    timeout 200 python3 docs/benchmarks/split_short_bwd_heads_gpu.py "$OUT/split_heads.json" > "$OUT/split_heads.log" 2>&1
    echo "split heads: exit $?"; grep '^{' "$OUT/split_heads.log" | cut -c1-200
    for round in 1 2; do
        for fam in triton flash; do
            rm -rf /tmp/e2e_$fam
            SEQPAR_SPLIT_SHORT_BWD=$fam timeout 150 seqpar-train model=llama_1b parallel=none data=synthetic \
                data.seq_len=65536 data.distribution=lognormal data.mean_len=16384 data.sigma=1.0 train=long \
                train.steps=10 train.warmup_steps=1 train.activation_checkpointing=selective train.global_batch_size=1 \
                train.micro_batch_size=1 launcher.nproc_per_node=1 logging.console=false run_dir=/tmp/e2e_$fam \
                > "$OUT/e2e_${fam}_r$round.log" 2>&1
            echo "e2e round $round $fam: exit $?"
            cp /tmp/e2e_$fam/metrics.jsonl "$OUT/e2e_${fam}_r${round}_metrics.jsonl" 2>/dev/null
            python3 -c "import json,sys; ms=[json.loads(l) for l in open(sys.argv[1])][2:]; \
print('   steps 3-10 mean step s', round(sum(m['step_time_s'] for m in ms)/len(ms),4), 'loss', ms[-1]['loss'])" \
                "$OUT/e2e_${fam}_r${round}_metrics.jsonl"
        done
    done
    exit 0
fi
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
for r in d["flash"]["rows"]:
    print("   ", r.get("layout"), r.get("S"), r.get("kernel") or r.get("impl") or r.get("name"),
          {k: v for k, v in r.items() if "tflops" in k or k.endswith("_ms")})
PY
    done
done
