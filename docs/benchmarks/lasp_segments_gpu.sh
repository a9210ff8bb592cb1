# Two GPUs (device tool), from the new code's root, .whl carried, the old code in $OLD:
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/lasp_segments_gpu.sh
# Issues 4 and 5: the lightning kernel's segments capped at 8192 tokens (c8f2856) against 2048 (the
# code before it, in $OLD). 1. the GPU tests of the kernel and of LASP on the new code; 2. `bench lasp`
# (LASP-2 and its one-GPU baseline) at 64k and 256k, old and new alternating on one machine;
# PART=2: issue 5's lightning rows (`bench kernels --only lightning`, 4k-256k and packed 64k, fla beside)
# and LASP-2 at 1M tokens, old then new (the kernels bench hit its 130 s limit in the nineteenth
# session's call 5 with fresh tuning: PART=3 runs only it, old then new, 280 s each, on one GPU).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
NEW=$(pwd)
bash docs/benchmarks/device_info.sh "$OUT"
install() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
if [ "${PART:-1}" = 1 ]; then
SEQPAR_FLASH_TUNE=0 timeout 200 python3 -m pytest -q -m gpu tests/test_lightning_triton.py tests/test_lasp.py \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
fi
bench() {  # name, code folder
    (cd "$2" && timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 262144 \
        --methods lasp2,lasp2_zigzag --iters 20 --warmup 5 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
    echo "$1: exit $?"
    grep -E "^\{|lasp2" "$OUT/$1.log" | grep -v Warning | tail -8
}
if [ "${PART:-1}" != 1 ]; then
    limit=130; [ "$PART" = 3 ] && limit=280
    for code in old new; do
        dir=$OLD; [ $code = new ] && dir=$NEW
        install "$dir"
        (cd "$dir" && SEQPAR_TUNE_CACHE=0 timeout $limit python3 -m seqpar.bench kernels --only lightning \
            --seq-lens 4096 16384 65536 262144 --packed-lens 65536 --reference-max-tokens 0 \
            --out "$OUT/lightning_$code.json" > "$OUT/lightning_$code.log" 2>&1)
        echo "lightning $code: exit $?"; grep "^seqpar " "$OUT/lightning_$code.log"
        [ "$PART" = 3 ] && continue
        (cd "$dir" && timeout 100 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 1048576 \
            --methods lasp2 --iters 10 --warmup 3 --out "$OUT/lasp_1m_$code.json" > "$OUT/lasp_1m_$code.log" 2>&1)
        echo "lasp 1M $code: exit $?"; grep "lasp2" "$OUT/lasp_1m_$code.log" | grep -v Warning | tail -2
    done
    exit 0
fi
for round in 1 2; do
    install "$OLD" && bench lasp_seg2048_r$round "$OLD"
    install "$NEW" && bench lasp_seg8192_r$round "$NEW"
done
