# Two GPUs (device tool, nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/disagg_ab_gpu.sh        (~8 minutes)
#   ... PART=2 OUT=DIR2 bash docs/benchmarks/disagg_ab_gpu.sh                                    (~7 minutes)
#   ... PART=3 OUT=DIR3 bash docs/benchmarks/disagg_ab_gpu.sh                                    (~4 minutes)
# Issue 10 after the twenty-eighth session: is disagg within 1.03x the balanced ideal with the planner's
# row cost and Triton weight 1.3 (3a77b25, be4b206), and do the servers' pieces over a prefix on cuDNN
# in chunks (SEQPAR_CUDNN_PREFIX=1, 716cea5; with 2ad0d6b a document past cuDNN's cap whole) help end to
# end? Part 1: attention alone per rank on the 16 steps (disagg_step_kernels_gpu.py on one GPU;
# 2026-11-28-gpu-28th/call3 measured 64.6 ms a step of excess over the ideal's attention with the old
# planner, 35.7 with the prefix pieces on cuDNN), then
# llama_1b dp=2 64k/GPU, eps 0.02, 18 steps: the ideal's lanes, disagg, disagg with the prefix pieces on
# cuDNN. Part 2, on another machine or the same: the ideal's lanes and both disagg lanes again in the
# other order (one run's mean moves ~0.5% between runs: 1.043x / 1.049x for one configuration), and the
# halves schedule with the prefix pieces on cuDNN (halves hid 0.98-0.99 of its transfers on 2 H200 but
# ran 1.18-1.19x at 64k against single's 1.09-1.12x; its cut of each server's local work makes a piece
# over a prefix, which runs on Triton unless the prefix pieces go to cuDNN: is that the difference?).
# Part 3: the layer bench at llama_1b's heads (32/8 x 64), 64k tokens per GPU of lognormal documents, eps
# 0.02, every batch's compute and transfers also timed alone (`--parts-batches`), without and with the
# prefix pieces on cuDNN: what the ~40 ms a step outside the servers' attention is (transfers, copies).
set -u
mkdir -p "$OUT"
if [ "${PART:-1}" = 3 ]; then
  for prefix in 0 1; do
    SEQPAR_CUDNN_PREFIX=$prefix timeout 110 torchrun --standalone --nproc_per_node 2 -m seqpar.bench disagg \
      --tokens 65536 --mixes lognormal --heads 32 --kv-heads 8 --head-dim 64 --eps 0.02 --batches 16 \
      --parts-batches 16 --out "$OUT/disagg_2gpu_64k_llama1b_prefix$prefix.json" 2>&1 | grep -v Warning | tail -3
  done
  exit 0
fi
if [ "${PART:-1}" = 1 ]; then
  for prefix in 0 1; do
    SEQPAR_CUDNN_PREFIX=$prefix timeout 100 python3 docs/benchmarks/disagg_step_kernels_gpu.py \
      "$OUT/step_kernels_prefix$prefix.json" 2>&1 | grep -v Warn | tail -1
  done
  lanes="dp2_as0 dp2_as1 dp2_disagg_eps02 dp2_disagg_prefix_eps02"
else
  lanes="dp2_disagg_prefix_eps02 dp2_disagg_eps02 dp2_as1 dp2_as0 dp2_disagg_prefix_halves_eps02"
fi
STEPS=18 LANES="$lanes" EXTRA=" " OUT="$OUT/gpu01_disagg_dp_cp_gpu_65536" \
  bash docs/benchmarks/disagg_dp_cp_gpu.sh 65536 2>&1 | grep -v Warn | tail -4
python3 docs/benchmarks/disagg_steps.py "$OUT/gpu01_disagg_dp_cp_gpu_65536" 2>&1 | tail -3
