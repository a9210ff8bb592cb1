# One GPU (device tool), from the new code's root, .whl carried, the old code in $OLD:
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/lightning_state_ab_gpu.sh
# Issue 5 (twenty-fifth session): the lightning state pass as one weighted sum over token blocks (new, ed89414,
# reverted in f34a13f: no faster, the pass sits at the HBM roofline either way)
# against the chunk recursion that decays its accumulator before every dot (old), on one machine.
# 1. the lightning GPU tests (bf16/fp16 against float64) on the new code; 2. per code, GPU ms per kernel
# (lightning_profile.py: 16 rows of 4k, one row of 64k and of 256k); 3. `bench kernels --only lightning`
# (issue 5's rows, fla beside them), new, old, new. PARTS="tests profile bench" picks steps.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
NEW=$(pwd)
PARTS=${PARTS:-"tests profile bench"}
install() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
if [[ " $PARTS " == *" tests "* ]]; then
    timeout 200 python3 -m pytest -q -m gpu tests/test_lightning_triton.py > "$OUT/tests.log" 2>&1
    echo "lightning gpu tests: exit $? ($(tail -1 "$OUT/tests.log"))"
fi
profile() {  # name, code folder
    install "$2"
    mkdir -p "$OUT/prof_$1"
    (cd "$2" && timeout 120 python3 docs/benchmarks/lightning_profile.py "$OUT/prof_$1" 16x4096 65536 262144 \
        > "$OUT/prof_$1.log" 2>&1; echo "profile $1: exit $?")
    grep -E "segment|ms" "$OUT/prof_$1.log" | head -20 | cut -c1-200
}
bench() {  # name, code folder
    install "$2"
    (cd "$2" && timeout 150 python3 -m seqpar.bench kernels --only lightning --seq-lens 4096 16384 65536 262144 \
        --packed-lens 65536 --reference-max-tokens 0 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
    echo "$1: exit $?"
    python3 - "$OUT/$1.json" <<'PY' 2>/dev/null
import json, sys
d = json.load(open(sys.argv[1]))
for r in d["lightning"]["rows"]:
    print(r.get("kernel"), r.get("layout"), r.get("B"), r.get("S"), r.get("fwdbwd_Mtok_s"))
print(json.dumps(d["lightning"]["summary"]))
PY
}
if [[ " $PARTS " == *" profile "* ]]; then profile new "$NEW"; profile old "$OLD"; fi
if [[ " $PARTS " == *" bench "* ]]; then bench lightning_new_r1 "$NEW"; bench lightning_old_r1 "$OLD"; bench lightning_new_r2 "$NEW"; fi
install "$NEW"
