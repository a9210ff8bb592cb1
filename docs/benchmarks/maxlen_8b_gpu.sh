# Issue 12 on two H200 (device tool, kind nvidia-h200-x2), carry .whl, in two calls:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/maxlen_8b_gpu.sh one   # <= 10 min
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/maxlen_8b_gpu.sh cp2   # <= 10 min
# `one`: two lanes. Lane 0: llama_8b on one GPU from 128k up (offload: AdamW's fp32 states alone
# are 120 GiB, so the rest is what decides); lane 1: llama_1b at 384k with full checkpointing (the
# estimate against today's code).
# `cp2`: llama_8b with cp=2 at 384k (the goal: 256k and >= 1.9x the one-GPU figure).
# One step per trial: the engine allocates the optimizer states before step 1.
mkdir -p "$OUT"
M="python3 -m seqpar.bench maxlen --step 32768"
if [ "$1" = one ]; then
    # 2026-11-26: an 8b trial at 160k did not finish in 280 s; the 1b 384k one needs ~170 s of step
    # plus start-up and autotuning at that length
    { CUDA_VISIBLE_DEVICES=0 timeout 580 $M --trial-timeout 400 --model llama_8b --modes full_offload \
        --start 131072 --max-len 196608 --out "$OUT/maxlen_8b_1gpu.json" > "$OUT/lane0.log" 2>&1; } &
    { CUDA_VISIBLE_DEVICES=1 timeout 420 $M --trial-timeout 400 --model llama_1b --modes full --start 393216 \
        --max-len 393216 --out "$OUT/maxlen_1b_384k.json" > "$OUT/lane1.log" 2>&1; } &
    wait
    grep -h '^{"seq_len"' "$OUT"/lane*.log
else
    timeout 560 $M --trial-timeout 540 --model llama_8b --cp 2 --modes full_offload --start 393216 --max-len 393216 \
        --out "$OUT/maxlen_8b_cp2.json" > "$OUT/cp2.log" 2>&1
    grep -h '^{"seq_len"' "$OUT/cp2.log"
fi
