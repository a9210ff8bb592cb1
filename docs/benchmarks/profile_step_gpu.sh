# Two GPUs (device tool, kind nvidia-h100-x2 / nvidia-h200-x2, or a pair of a 4-GPU machine through
# pairs_gpu.sh), repo root, .whl carried:   bash docs/benchmarks/profile_step_gpu.sh
# One whole training step profiled (logging.profile_step) for the layouts the simulator misses
# (docs/sim.md: llama_1b dp2 / tp2 / pp2xV2 at 32k are 13-20% slower than predicted, ~215 ms per
# step, while cp2 and hybrid_1b dp2 fit): llama_1b and hybrid_1b, dp=2 (FSDP2), 32k tokens per
# sequence, fourd_gpu.sh's settings, step 5 of 6 profiled. About 4 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
COMMON="data=synthetic data.seq_len=32768 data.distribution=fixed data.mean_len=32768 train=long train.steps=6
  train.warmup_steps=1 train.global_batch_size=2 train.micro_batch_size=1 launcher.nproc_per_node=2
  logging.console=false logging.profile_step=5 parallel=none"
for model in llama_1b hybrid_1b; do
  run=/tmp/profile_step/$model; rm -rf "$run"
  # shellcheck disable=SC2086
  timeout 110 seqpar-train model=$model $COMMON run_dir=$run > "$OUT/${model}_dp2.log" 2>&1
  echo "$model dp2: exit $?"
  cp "$run/metrics.jsonl" "$OUT/${model}_dp2_metrics.jsonl" 2>/dev/null
  for f in "$run"/profile/*.txt; do [ -f "$f" ] && cp "$f" "$OUT/${model}_dp2_$(basename "$f")"; done
  head -n 22 "$OUT/${model}_dp2_step5_rank0.txt" 2>/dev/null | cut -c1-200
done
