# Issue 5, element-wise kernels and fused linear + CE, on ONE GPU (about 4 minutes, at most 5):
# the Triton RMSNorm / RoPE / cross-entropy GPU tests (bf16 vs float64), then the `fused` section of
# the kernels benchmark (HBM copy anchor, F.rms_norm, unfused torch RoPE, unfused linear + CE at
# 64k tokens x 128k vocabulary). Run through the device tool from the repo root (carry .whl):
#   bash docs/benchmarks/fused_gpu.sh
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu tests/test_fused_triton.py tests/test_kernels.py \
    -k "fused or rms_norm or rotary or cross_entropy" > "$OUT/fused_gpu_tests.log" 2>&1
echo "gpu tests exit $?"; grep -E "passed|failed|Error|assert" "$OUT/fused_gpu_tests.log" | tail -12
timeout 170 python3 -m seqpar.bench kernels --only fused --out "$OUT/fused.json" > "$OUT/fused_bench.log" 2>&1
echo "bench exit $?"; grep -vE "^\{'kernel'" "$OUT/fused_bench.log" | tail -25
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
