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
    causal, nq, nk = shape
    k = torch.randn(1, nk, H, D, device="cuda", dtype=torch.bfloat16)
    q = k[:, nk - nq:]
    def run():
        out, lse = aten.attention_with_lse(q, k, k, kernel="cudnn", causal=causal)
        aten.attention_backward(out, q, k, k, out, lse, kernel="cudnn", causal=causal)
    return timed(run), timed(run)  # the first call, then one with the plan surely built


rows = []
for i, shape in enumerate(SHAPES):
    for capture in (False, True):
        split._CAPTURE["ok"] = capture
        s = (shape[0], shape[1] + 64 * (2 * i + capture), shape[2] + 64 * (2 * i + capture))  # unbuilt lengths
        build = timed(lambda: split.build_plans([s], H, D, device="cuda", scale=D ** -0.5))
        first, warm = first_call(s)
        rows.append(dict(shape=s, capture=capture, capture_ok=split._CAPTURE["ok"], build_host_ms=build[0],
                         build_gpu_ms=build[1], first_call_host_ms=first[0], first_call_gpu_ms=first[1],
                         warm_call_host_ms=warm[0], warm_call_gpu_ms=warm[1]))
        print(rows[-1], flush=True)
json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows},
          open(sys.argv[1], "w"), indent=1)
