# Two GPUs (device tool, nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/disagg_prefix_gpu.sh
# Issue 10, the servers' pieces over a prefix on cuDNN in chunks (716cea5, SEQPAR_CUDNN_PREFIX=1), ~9 minutes:
# 1. the split's task GPU tests with and without it (bf16 against float64 and the Triton kernel);
# 2. llama_1b dp=2 64k/GPU end to end, eps 0.02: the balanced ideal's lanes, disagg as it is, disagg with
#    the prefix pieces on cuDNN (its shapes prebuilt before step 1); each step's ratio by disagg_steps.py;
# 3. the cost table at llama_1b's heads with it (per task fwd and fwd+bwd: against the Triton times of
#    2026-11-28-gpu-28th/call1/cost_table_llama_1b.json).
set -u
mkdir -p "$OUT"
SEQPAR_FLASH_TUNE=0 timeout 150 python3 -m pytest -q -m gpu tests/test_flash_split.py -k "task_split" 2>&1 | tail -4
STEPS=18 LANES="dp2_as0 dp2_as1 dp2_disagg_eps02 dp2_disagg_prefix_eps02" EXTRA=" " \
  OUT="$OUT/gpu01_disagg_dp_cp_gpu_65536" bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 2>&1 | grep -v Warn | tail -8
grep -h "cuDNN attention plans" "$OUT"/gpu01_disagg_dp_cp_gpu_65536/*.log
python3 docs/benchmarks/disagg_steps.py "$OUT/gpu01_disagg_dp_cp_gpu_65536" 2>&1 | tail -4
SEQPAR_CUDNN_PREFIX=1 timeout "${TABLE_S:-120}" python3 -m seqpar.bench disagg \
  --profile-cost-table "$OUT/cost_table_llama_1b_prefix.json" --heads 32 --kv-heads 8 --head-dim 64 2>&1 | tail -3
