"""One GPU (device tool): what a cuDNN plan build costs the host and the GPU, built by running its
calls (the old way) or inside a thrown-away CUDA graph capture (split._unrun), and what the first
real call of the shape costs after each. Shapes: a disagg server's calls at llama_1b's 32 heads,
head dim 64 (squares and non-causal prefix pieces).
    python docs/benchmarks/plan_capture_gpu.py OUT.json"""
import json
import sys
import time

import torch

from seqpar.kernels.flash_attn import aten, split

H, D = 32, 64
SHAPES = [(True, 12288, 12288), (False, 4096, 24576), (False, 9216, 16384), (True, 3072, 3072)]


def timed(fn):
    """(host ms, GPU ms) of fn: host from the call to its return, GPU from two events around it."""
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = time.perf_counter()
    a.record()
    fn()
    host = (time.perf_counter() - t) * 1e3
    b.record()
    torch.cuda.synchronize()
    return round(host, 2), round(a.elapsed_time(b), 2)


def first_call(shape):
    """(host ms, GPU ms) of the shape's first forward on this thread and its first backward on the
    autograd engine's (where training runs it), then the same again (plans surely built)."""
    causal, nq, nk = shape
    k = torch.randn(1, nk, H, D, device="cuda", dtype=torch.bfloat16)
    q = k[:, nk - nq:]
    fwd = lambda: aten.attention_with_lse(q, k, k, kernel="cudnn", causal=causal)  # noqa: E731
    out, lse = fwd()
    bwd = lambda: split._RunInBackward.apply(  # noqa: E731
        torch.zeros((), device="cuda", requires_grad=True),
        lambda: aten.attention_backward(out, q, k, k, out, lse, kernel="cudnn", causal=causal)).backward()
    return [timed(f) for f in (fwd, bwd, fwd, bwd)]


rows = []
for i, shape in enumerate(SHAPES):
    for capture in (True, False):  # the capture first: its warm-up calls are the process's first cuDNN calls
        split._CAPTURE["ok"] = capture
        s = (shape[0], shape[1] + 64 * (2 * i + capture), shape[2] + 64 * (2 * i + capture))  # unbuilt lengths
        build = timed(lambda: split.build_plans([s], H, D, device="cuda", scale=D ** -0.5))
        calls = first_call(s)
        rows.append(dict(shape=s, capture=capture, capture_ok=split._CAPTURE["ok"], build_host_ms=build[0],
                         **{f"{n}_{what}_ms": t[i] for n, t in zip(("fwd1", "bwd1", "fwd2", "bwd2"), calls)
                            for i, what in enumerate(("host", "gpu"))}))
        print(rows[-1], flush=True)
json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
          open(sys.argv[1], "w"), indent=1)
