# Two GPUs, after the Triton lightning kernel landed (run like two_gpu.sh): the default training
# job on both GPUs, the kernel's GPU tests, the LASP benchmark, the kernels benchmark.
mkdir -p "$OUT"
timeout 150 seqpar-train logging.console=false run_dir=/tmp/default_job > "$OUT/default_job.log" 2>&1
cp /tmp/default_job/metrics.jsonl "$OUT/default_job_metrics.jsonl"; tail -1 "$OUT/default_job_metrics.jsonl"
grep -E "Error|error" "$OUT/default_job.log" | head -5
timeout 120 python3 -m pytest -q -m gpu tests/test_lightning_triton.py 2>&1 | tail -8
timeout 180 torchrun --standalone --nproc_per_node 2 -m seqpar.bench lasp --tokens 65536 262144 \
    --out "$OUT/lasp_2gpu.json" > "$OUT/lasp.log" 2>&1; tail -12 "$OUT/lasp.log"
timeout 120 python3 -m seqpar.bench kernels --out "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1; tail -15 "$OUT/kernels.log"
