# Two GPUs (device tool), from the new code's root, .whl carried, the old code in $OLD:
#   source docs/benchmarks/gpu_setup.sh && OLD=.snap_old OUT=DIR bash docs/benchmarks/lasp_host_ab_gpu.sh
# Issue 4, LASP-2 bound by its host at 32k tokens per GPU (twenty-third session): the new code against the
# old, alternating on one machine. 1. on the new code, the host time by piece (lasp_host_parts_gpu.py) and
# the steady-state step against its GPU compute (lasp_steady_gpu.py); 2. `bench lasp` (LASP-2 and its
# one-GPU baseline, accuracy checked against float64) at 64k and 256k, --rounds 3, old, new, old, new.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
NEW=$(pwd)
install() { (cd "$1" && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
timeout 100 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host_parts_gpu.py "$OUT/host_parts.json" \
    32768 > "$OUT/host_parts.log" 2>&1
echo "host parts: exit $?"; grep "host" "$OUT/host_parts.log" | grep -v Warn
timeout 150 torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_steady_gpu.py "$OUT/steady.json" 32768 3 \
    > "$OUT/steady.log" 2>&1
echo "steady: exit $?"; grep -E "ms per rank|compute|kernel alone" "$OUT/steady.log" | cut -c1-200
bench() {  # name, code folder
    (cd "$2" && timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 262144 \
        --methods lasp2 --rounds 3 --iters 20 --warmup 5 --out "$OUT/$1.json" > "$OUT/$1.log" 2>&1)
    echo "$1: exit $?"
    grep -E "lasp2|check|err" "$OUT/$1.log" | grep -v Warning | tail -6 | cut -c1-300
}
for round in 1 2; do
    install "$OLD" && bench lasp_old_r$round "$OLD"
    install "$NEW" && bench lasp_new_r$round "$NEW"
done
