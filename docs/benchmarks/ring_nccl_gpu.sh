# Two GPUs (device tool), from the repo root, .whl carried:
#   source docs/benchmarks/gpu_setup.sh && OUT=DIR bash docs/benchmarks/ring_nccl_gpu.sh
# Issue 3: does NCCL's transfer kernel slow the attention kernels it overlaps? In the 2-rank
# cuDNN ring at 32k (2026-11-27-gpu-17th/call1's profiles) the backward kernels took 21.0 ms beside
# the transfers and 18.9 ms without them, the forward 7.0 against 6.6. NCCL's send/recv runs on SMs
# (channels = CTAs); fewer channels, or the copy engines doing the copy (NCCL_P2P_USE_CUDA_MEMCPY),
# leave the attention more of the GPU. One 32k ring bench per setting, both kernel families.
# Then (GPU 0 alone) the lightning kernels' profile at one 64k row against four 16k rows (issue 5's
# flatness: one 64k row's backward ran 22% slower than four 16k rows' on H200).
[ -n "$SEQPAR_GPU_READY" ] || source docs/benchmarks/gpu_setup.sh
python3 -c "import torch; print('nccl', torch.cuda.nccl.version())" | tee "$OUT/nccl_version.txt"
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 docs/benchmarks/lightning_profile.py "$OUT" 65536 4x16384 16384 4096 16x4096 \
    > "$OUT/lightning_profile.log" 2>&1
echo "lightning profile: exit $?"
for setting in default NCCL_MAX_NCHANNELS=2 NCCL_MAX_NCHANNELS=8 NCCL_P2P_USE_CUDA_MEMCPY=1 NCCL_NCHANNELS_PER_PEER=1; do
    name=${setting//=/_}
    env $([ "$setting" = default ] || echo "$setting") timeout 100 torchrun --standalone --nproc_per_node 2 -m seqpar.bench ring \
        --seq-lens 32768 --packed-lens --torch-cp-rotate --methods ring --iters 10 --warmup 3 \
        --out "$OUT/ring_$name.json" > "$OUT/ring_$name.log" 2>&1
    echo "$setting: exit $?"
    grep "^{" "$OUT/ring_$name.log" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print('   ', d['S'], d['kernel'], 'single', round(d['single_ms'], 2), 'ring', round(d['ring_ms'], 2),
          'compute-only', round(d.get('compute_only_ms', 0), 2), 'exposed', d.get('exposed_comm_ms'), 'eff', d.get('efficiency'))"
done
