# Two GPUs (device tool), from the new code's root, .whl carried, the old code in $OLD:
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/lasp_launch_ab_gpu.sh
# Issue 4 (twenty-fourth session): LASP-2's host with kernels/launch.py (new) against without (old), on one
# machine. 1. the GPU test of the flash fast paths (its lse expectation fixed this session); 2. per code:
# rank 0's cProfile of 20 steady LASP-2 steps (lasp_host.py) and the host time by piece (lasp_host_parts_gpu.py);
# 3. `bench lasp` at 64k, --rounds 3, old then new then old then new.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
NEW=$(pwd)
install() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
SEQPAR_FLASH_TUNE=0 timeout 120 python3 -m pytest -q -m gpu tests/test_kernels.py -k fast_paths > "$OUT/fast_paths.log" 2>&1
echo "fast paths test: exit $?"; tail -2 "$OUT/fast_paths.log"
host() {  # name, code folder
    install "$2"
    mkdir -p "$OUT/prof_$1"
    (cd "$2" && timeout 100 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host.py "$OUT/prof_$1" 32768 \
        > "$OUT/prof_$1.log" 2>&1; echo "profile $1: exit $?"
     timeout 100 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host_parts_gpu.py "$OUT/host_parts_$1.json" \
        32768 > "$OUT/host_parts_$1.log" 2>&1; echo "host parts $1: exit $?")
    grep "host" "$OUT/host_parts_$1.log" | grep -v Warn | cut -c1-200
}
bench() {  # name, code folder
    install "$2"
    (cd "$2" && timeout 120 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 \
        --methods lasp2 --rounds 3 --iters 20 --warmup 5 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
    echo "$1: exit $?"
    grep -E "lasp2|err" "$OUT/$1.log" | grep -v Warning | tail -3 | cut -c1-300
}
host old "$OLD"; host new "$NEW"
bench lasp_old_r1 "$OLD"; bench lasp_new_r1 "$NEW"; bench lasp_old_r2 "$OLD"; bench lasp_new_r2 "$NEW"
install "$NEW"
