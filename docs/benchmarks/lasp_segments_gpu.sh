# Two GPUs (device tool), from the new code's root, .whl carried, the old code in $OLD:
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/lasp_segments_gpu.sh
# Issues 4 and 5: the lightning kernel's segments capped at 8192 tokens (c8f2856) against 2048 (the
# code before it, in $OLD). 1. the GPU tests of the kernel and of LASP on the new code; 2. `bench lasp`
# (LASP-2 and its one-GPU baseline) at 64k and 256k, old and new alternating on one machine.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
NEW=$(pwd)
bash docs/benchmarks/device_info.sh "$OUT"
SEQPAR_FLASH_TUNE=0 timeout 200 python3 -m pytest -q -m gpu tests/test_lightning_triton.py tests/test_lasp.py \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/gpu_tests.log"))"
install() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
bench() {  # name, code folder
    (cd "$2" && timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 262144 \
        --methods lasp2,lasp2_zigzag --iters 20 --warmup 5 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
    echo "$1: exit $?"
    grep -E "^\{|lasp2" "$OUT/$1.log" | grep -v Warning | tail -8
}
for round in 1 2; do
    install "$OLD" && bench lasp_seg2048_r$round "$OLD"
    install "$NEW" && bench lasp_seg8192_r$round "$NEW"
done
