# One GPU (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/lightning_small_gpu.sh
# The lightning kernel at one row (B=1) of 4k-128k tokens, the calls LASP-2 makes on 2 GPUs
# (issue 4's 64k case is two 32k calls): the default segment length beside others, then a
# per-kernel profile at 32k and 64k (lightning_profile.py). About 2 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
timeout 240 python3 -m seqpar.bench kernels --only lightning --seq-lens 4096 8192 16384 32768 65536 131072 --packed-lens \
    --tokens 4096 --seg-lens 256 512 1024 2048 --out "$OUT/lightning_b1.json" > "$OUT/lightning_b1.log" 2>&1
echo "bench exit $?"; grep -o "'kernel': '[^']*', 'layout': 'dense', 'B': 1, 'S': [0-9]*\|'fwdbwd_Mtok_s': [0-9.]*\|'seg_len': [0-9]*" \
    "$OUT/lightning_b1.log" | paste -sd' ' | sed "s/'kernel'/\n'kernel'/g"
timeout 120 python3 docs/benchmarks/lightning_profile.py "$OUT" 32768 65536 > "$OUT/lightning_profile.log" 2>&1
echo "profile exit $?"; tail -60 "$OUT/lightning_profile.log"
