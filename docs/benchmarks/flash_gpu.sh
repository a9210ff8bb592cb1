# Issue 5, the Triton flash-attention kernel on ONE GPU, at most 8 minutes (150 s of tests, 320 s
# of benchmark): its GPU tests (bf16 vs the float64 reference; one autotune config,
# SEQPAR_FLASH_TUNE=0, so the many variants compile fast), then the `flash` section of the kernels
# benchmark (dense causal 16k/64k beside SDPA cuDNN/flash and FlexAttention, packed lognormal
# documents beside Flex's document mask and torch's varlen flash, one ring step).
# Run through the device tool from the repo root (carry .whl):
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/flash_gpu.sh
mkdir -p "$OUT"
SEQPAR_FLASH_TUNE=0 timeout 150 python3 -m pytest -q -m gpu tests/test_flash_triton.py > "$OUT/flash_tests.log" 2>&1
tail -25 "$OUT/flash_tests.log"
timeout 320 python3 -m seqpar.bench kernels --only flash --out "$OUT/flash.json" > "$OUT/flash_bench.log" 2>&1
tail -25 "$OUT/flash_bench.log"
python3 -c "import json; r = json.load(open('$OUT/flash.json'))['flash']; print(json.dumps(r['tuned_configs'], indent=0)[:3000])" 2>&1 | tail -20
