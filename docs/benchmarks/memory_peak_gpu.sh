# What is live at the peak of a one-GPU llama_1b step (logging.memory_snapshot, seqpar/memtrace.py),
# beside the memory estimate's terms (seqpar/memory.py), for the cases it overshoots: full
# checkpointing at 128k (+6.3% on H100, 2026-11-26) and 384k (+11.2%), and offload (+1.6% at 512k).
# One H100/H200 (device tool; repo root, .whl carried), about 3 minutes:
#   bash docs/benchmarks/memory_peak_gpu.sh
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}
# `memory_peak_gpu.sh SEQ[,MODE...]` (pairs_gpu.sh "memory_peak_gpu.sh:98304,selective_chunked@1"):
# another length, some of the modes
IFS=, read -r SEQ MODES <<< "${1:-131072}"
MODES=${MODES:-full,full_offload,selective_chunked}
timeout 60 python3 -m pytest -q -m gpu tests/test_memtrace.py 2>&1 | tail -2
BASE="model=llama_1b train=long data=synthetic data.distribution=fixed data.seq_len=$SEQ data.mean_len=$SEQ
  parallel.cp=1 train.steps=1 train.warmup_steps=1 logging.console=true logging.memory_snapshot=true launcher.nproc_per_node=1"
for mode in ${MODES//,/ }; do
  case $mode in
    full) M="train.activation_checkpointing=full" ;;
    full_offload) M="train.activation_checkpointing=full train.offload_activations=true train.mlp_chunk_tokens=8192" ;;
    selective_chunked) M="train.activation_checkpointing=selective train.mlp_chunk_tokens=8192" ;;
  esac
  run=/tmp/memory_peak/$mode; rm -rf "$run"
  # shellcheck disable=SC2086
  HYDRA_FULL_ERROR=1 timeout 150 seqpar-train $BASE $M run_dir=$run > "$OUT/${mode}_${SEQ}.log" 2>&1
  echo "== $mode $SEQ: exit $?, $(grep -o '"max_mem_gb": [0-9.]*' "$run/metrics.jsonl")"
  cp "$run/memory/peak_rank0.txt" "$OUT/${mode}_${SEQ}_peak.txt" 2>/dev/null && cut -c1-160 "$OUT/${mode}_${SEQ}_peak.txt" | head -24
  # the estimate's table for the same config, as the run printed it
  grep -A12 "memory per rank" "$OUT/${mode}_${SEQ}.log" | head -13
done
