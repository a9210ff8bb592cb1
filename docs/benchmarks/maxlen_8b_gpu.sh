# Issue 12 on two H200 (device tool, kind nvidia-h200-x2), carry .whl, in two calls:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/maxlen_8b_gpu.sh one   # <= 10 min
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/maxlen_8b_gpu.sh cp2   # <= 10 min
# `one`: two lanes of llama_8b on one GPU each. Lane 0: AdamW's moments in host memory
# (full_offload_optimizer) at 128k, the goal. Lane 1: the moments on the GPU (full_offload), from
# the estimate's answer (88k) to 96k: where one GPU stops when it holds all 16 bytes per parameter.
# `cp2`: llama_8b with cp=2 at 256k in lane 0's mode (the same 128k tokens per GPU as lane 0: the
# per-GPU activation memory should match lane 0's, the model state halves under FSDP).
# One step per trial: the engine allocates the optimizer states before step 1. An 8b step at 128k
# is ~30 PFLOP (about 70 s on an H200) plus start-up.
mkdir -p "$OUT"
M="python3 -m seqpar.bench maxlen --step 8192"
if [ "$1" = one ]; then
    timeout 120 python3 -m pytest -q -m gpu tests/test_optim_offload.py 2>&1 | tail -2
    { CUDA_VISIBLE_DEVICES=0 timeout 440 $M --trial-timeout 420 --model llama_8b --modes full_offload_optimizer \
        --start 131072 --max-len 131072 --out "$OUT/maxlen_8b_1gpu_offload_optimizer.json" > "$OUT/lane0.log" 2>&1; } &
    { CUDA_VISIBLE_DEVICES=1 timeout 440 $M --trial-timeout 300 --model llama_8b --modes full_offload \
        --start 90112 --max-len 98304 --out "$OUT/maxlen_8b_1gpu.json" > "$OUT/lane1.log" 2>&1; } &
    wait
    grep -h '^{"seq_len"' "$OUT"/lane*.log
else
    timeout 560 $M --trial-timeout 540 --model llama_8b --cp 2 --modes full_offload_optimizer --start 262144 --max-len 262144 \
        --out "$OUT/maxlen_8b_cp2.json" > "$OUT/cp2.log" 2>&1
    grep -h '^{"seq_len"' "$OUT/cp2.log"
fi
