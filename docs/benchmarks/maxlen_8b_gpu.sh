# Issue 12 on two H200 (device tool, kind nvidia-h200-x2), carry .whl:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/maxlen_8b_gpu.sh
# Two lanes, then both GPUs. Lane 0: llama_8b on one GPU (offload: AdamW's fp32 states alone are
# 120 GiB), 128k (the goal) then one 32k step up; lane 1: llama_1b at 384k with full checkpointing
# (the estimate's check against today's code). Then llama_8b with cp=2 at 288k (>= 1.9x one GPU's
# 128k; the goal is 256k). One step per trial: the engine allocates the optimizer states before it.
mkdir -p "$OUT"
M="python3 -m seqpar.bench maxlen --step 32768 --trial-timeout 280"
{ CUDA_VISIBLE_DEVICES=0 timeout 275 $M --model llama_8b --modes full_offload --start 131072 --max-len 163840 \
    --out "$OUT/maxlen_8b_1gpu.json" > "$OUT/lane0.log" 2>&1; } &
{ CUDA_VISIBLE_DEVICES=1 timeout 250 $M --model llama_1b --modes full --start 393216 --max-len 393216 \
    --out "$OUT/maxlen_1b_384k.json" > "$OUT/lane1.log" 2>&1; } &
wait
timeout 290 $M --model llama_8b --cp 2 --modes full_offload --start 294912 --max-len 294912 \
    --out "$OUT/maxlen_8b_cp2.json" > "$OUT/cp2.log" 2>&1
grep -h '^{"seq_len"' "$OUT"/lane0.log "$OUT"/lane1.log "$OUT"/cp2.log
