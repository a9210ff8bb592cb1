# The plain-PyTorch anchor of issue 12 (../shared/anchors/anchors_e2e.py --maxlen: the longest
# llama_1b sequence that trains one step, 8k granularity, without and with every block
# checkpointed), on ONE GPU beside seqpar's maxlen_gpu.sh lanes in the same call, e.g. on a 4-GPU
# machine:  pairs_gpu.sh "maxlen_gpu.sh" "maxlen_anchor_gpu.sh@1 split_attn_gpu.sh@1"
# Needs the anchors carried as .anchors (cp -r ../shared/anchors .snap/.anchors). Its search is a
# few one-step trials per mode (galloping, then bisecting: ~140k with checkpointing on an H100).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}
if [ ! -f .anchors/anchors_e2e.py ]; then
  echo "maxlen_anchor_gpu.sh: .anchors/anchors_e2e.py missing: carry a copy of ../shared/anchors as .anchors" >&2
  exit 2
fi
timeout 420 python3 .anchors/anchors_e2e.py --maxlen > "$OUT/anchor_maxlen.log" 2>&1
echo "anchor maxlen: exit $?"
tail -n 3 "$OUT/anchor_maxlen.log" | cut -c1-300
