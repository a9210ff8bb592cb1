# Issue 2 on one GPU: GPU tests, then llama_1b at 16k context beside the plain-PyTorch anchor.
# Run through the device tool from the repo root (carry .whl and .anchors, a copy of ../shared/anchors):
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/foundation_gpu.sh
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -m gpu ${GPU_TESTS:-tests/test_gpu.py tests/test_kernels.py} 2>&1 | tail -8
timeout 200 seqpar-train model=llama_1b parallel=none data=synthetic data.seq_len=16384 data.distribution=fixed \
    data.mean_len=16384 train=long train.steps=20 launcher.nproc_per_node=1 logging.console=false \
    run_dir=/tmp/llama_1b_16k 2>&1 | tail -3
cp /tmp/llama_1b_16k/metrics.jsonl "$OUT/llama_1b_16k_metrics.jsonl"
tail -2 "$OUT/llama_1b_16k_metrics.jsonl"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu --format=csv
timeout 200 python3 .anchors/anchors_e2e.py 2>&1 | tail -3
