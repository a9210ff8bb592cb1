# Two GPUs (device tool, kind nvidia-h100-x2 or nvidia-h200-x2), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && bash docs/benchmarks/ring_folds_gpu.sh
# Ring attention's fold plans (issue 3): the GPU tests of test_ring (bf16 ring vs fp64 on NCCL, and
# no host synchronisation in a second layer's fwd+bwd), then the 2026-11-26 profile's cases again
# (dense 32k and packed 64k, cuDNN family, torch's context_parallel beside), plain and profiled,
# so that the element-wise kernels (add_/copy_/fill_/addcmul_) and cudaStreamSynchronize per case
# can be set against docs/benchmarks/2026-11-26-2xh100-profile/ring. About 4 minutes (8 at most), each step
# under a timeout.
mkdir -p "$OUT"
timeout 120 python3 -m pytest -q -m gpu tests/test_ring.py 2>&1 | tail -6
timeout 150 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring --seq-lens 32768 --packed-lens 65536 \
  --kernels cudnn --torch-cp-rotate allgather --out "$OUT/ring.json" 2>&1 | grep -v Warning | grep '^{' > "$OUT/ring.log"
cat "$OUT/ring.log"
timeout 200 torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py "$OUT/profile" ring \
  --seq-lens 32768 --packed-lens 65536 --kernels cudnn --torch-cp-rotate allgather --out "$OUT/ring_profiled.json" \
  2>&1 | grep -v Warning | tail -3
gzip -kf "$OUT"/profile/profile_rank*.txt 2>/dev/null
python3 - "$OUT" <<'PY'
import re, sys, pathlib
text = (pathlib.Path(sys.argv[1]) / "profile" / "profile_rank0.txt").read_text() if (pathlib.Path(sys.argv[1]) / "profile" / "profile_rank0.txt").exists() else ""
for section in text.split("\n===== ")[1:]:
    head = section.splitlines()[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\s*(aten::(?:add_|add|copy_|fill_|addcmul_|addcmul|mul_|mul|cat|zero_)|cudaStreamSynchronize)\s+.*?(\d+)\s*$", line)
        if m and m.group(1) not in rows:
            cols = line.split()
            rows[m.group(1)] = f"{cols[-5]} CUDA, {cols[-1]} calls" if "aten" in m.group(1) else f"{cols[-1]} calls"
    print("case", head.strip("= "), "|", "; ".join(f"{k} {v}" for k, v in rows.items()))
PY
