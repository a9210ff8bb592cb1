# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/two_gpu.sh
# GPU correctness first (bf16 vs fp64 references, all softmax methods on NCCL), then the default
# training job on both GPUs, then the ring benchmark beside PyTorch's context_parallel.
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu tests/test_ring.py tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -12
timeout 120 seqpar-train logging.console=false run_dir=/tmp/default_job 2>&1 | tail -3
cp /tmp/default_job/metrics.jsonl "$OUT/default_job_metrics.jsonl" && tail -2 "$OUT/default_job_metrics.jsonl"
timeout 300 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --out "$OUT/ring_2gpu.json" 2>&1 | tail -25
