# One GPU (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/flash_heads_gpu.sh [HEADS [MIX]]
# The flash section at HEADS query heads (default 4: Llama-8B's 32 over tp=8): packed rows of 32k
# and 64k (FlexAttention's block mask of a 128k row needs 128 GiB), the split against one Triton
# call at a tensor-parallel rank's share of the heads; and one document of 16k and 32k, cuDNN
# against Triton: the two sides of split.min_doc_len(heads). MIX: the packed rows' document
# lengths (lognormal, or wlbllm / prolong of bench disagg). About 3 minutes.
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
timeout 300 python3 -m seqpar.bench kernels --only flash --heads "${1:-4}" --flash-dense-lens 16384 32768 \
    --flash-packed-lens 32768 65536 --flash-no-ring-step --flash-mix "${2:-lognormal}" \
    --out "$OUT/flash_heads${1:-4}_${2:-lognormal}.json" \
    > "$OUT/flash_heads.log" 2>&1
echo "exit $?"; grep -o "'kernel': '[^']*'\|'S': [0-9]*\|'fwdbwd_ms': [0-9.]*\|'fwdbwd_tflops': [0-9.]*" \
    "$OUT/flash_heads.log" | paste -sd' ' | sed "s/'kernel'/\n'kernel'/g"
