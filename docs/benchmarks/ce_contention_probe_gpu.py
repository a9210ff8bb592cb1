"""Issue 3: does a transfer beside attention slow the attention less when the copy engines move it
than when NCCL's send/receive kernels do? One process, two GPUs (device tool, 2-GPU kind):

    python3 docs/benchmarks/ce_contention_probe_gpu.py OUT.json

On GPU 0, cuDNN causal attention fwd+bwd at the 2-rank ring's block shape (16k rows, H=32, D=128,
bf16) is timed alone, then while a side stream moves 268 MB blocks (a 16k-row K/V shard) to and
from GPU 1 back to back: (a) `copy_` between the devices (cudaMemcpyPeerAsync: the copy engines, no
SM), (b) NCCL (`torch.cuda.nccl` broadcasts across the two devices from this one process: NCCL's
kernels on both GPUs' SMs, as the ring's batch_isend_irecv runs them). In the 32k ring's profile
(2026-11-27-gpu-17th/call1) cuDNN's kernels ran 2.3 ms (9%) longer beside NCCL's transfers than
without them; if (a) costs the attention little, a copy-engine transport is the way to 0.95."""
import json
import sys

import torch
import torch.cuda.nccl as nccl
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, D, S = 32, 128, 16384
MB = 268


def attention_ms(side=None, reps=10):
    """Median ms of one fwd+bwd on GPU 0, with `side()` enqueuing transfers on a side stream first."""
    torch.cuda.set_device(0)
    q, k, v, do = (torch.randn(1, H, S, D, device="cuda:0", dtype=torch.bfloat16, requires_grad=i < 3)
                   for i in range(4))
    stream = torch.cuda.Stream(device=0)
    times = []
    for i in range(reps + 3):
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        if side is not None:
            stream.wait_stream(torch.cuda.current_stream(0))
            with torch.cuda.stream(stream):
                side()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(do)
        end.record()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        if i >= 3:
            times.append(start.elapsed_time(end))
        q.grad = k.grad = v.grad = None
    return sorted(times)[len(times) // 2]


def main(path):
    n = MB * 2 ** 20 // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda:0")
    b = torch.empty(n, dtype=torch.bfloat16, device="cuda:1")
    copies = 24  # enough transfers to cover the attention's ~14 ms

    def copy_engine():
        for i in range(copies):
            (b.copy_(a, non_blocking=True) if i % 2 == 0 else a.copy_(b, non_blocking=True))

    def nccl_kernels():
        for i in range(copies):
            nccl.broadcast([a, b] if i % 2 == 0 else [b, a])  # root = the first tensor's device

    def one(fn, reps=5):
        torch.cuda.synchronize(0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        return start.elapsed_time(end) / reps / copies

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "nccl": list(nccl.version()),
              "shape": {"S": S, "H": H, "D": D}, "block_mb": MB,
              "transfer_ms": {"copy_engine": one(copy_engine), "nccl": one(nccl_kernels)},
              "attention_ms": {"alone": attention_ms(), "beside_copy_engine": attention_ms(copy_engine),
                               "beside_nccl": attention_ms(nccl_kernels)}}
    result["attention_ms"]["alone_again"] = attention_ms()
    print(json.dumps(result, indent=1))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
