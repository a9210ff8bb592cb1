"""Why `bench kernels --only lightning` reads one 64k row ~0.4 ms slower than lightning_profile.py's
loop (2026-11-28, one H200: 3.89 ms against 3.41 of kernel time; 16 x 4k rows 3.02 against 2.97):
fwd+bwd of `kernels.lightning_attn`, H=32, D=128, bf16, timed four ways on the same inputs, each
twice in turn: triton's do_bench as the bench calls it (L2 flushed, grads set to None), do_bench
without the flush, a back-to-back event loop with grads set to None, and the same loop letting
the grads accumulate (as the profile script does).

    python3 docs/benchmarks/lightning_timer_probe_gpu.py OUT.json [65536 16x4096 ...]
"""
import json
import sys

import torch
import triton.testing as tt

from seqpar import kernels


def loop(fn, grads=None, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        if grads:
            for t in grads:
                t.grad = None
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def no_flush(fn, grads):
    real = tt.runtime.driver.active.clear_cache if hasattr(tt.runtime.driver.active, "clear_cache") else None
    if real is None:
        return None
    tt.runtime.driver.active.clear_cache = lambda cache: None
    try:
        return tt.do_bench(fn, warmup=50, rep=300, return_mode="median", grad_to_none=grads)
    finally:
        tt.runtime.driver.active.clear_cache = real


def main(out, specs):
    H, D, dev = 32, 128, torch.device("cuda")
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    rows = []
    for spec in specs:
        B, S = (int(x) for x in spec.split("x")) if "x" in spec else (1, int(spec))
        gen = torch.Generator(device=dev).manual_seed(S)
        q, k, v, do = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()

        def fn():
            kernels.lightning_attn(q, k, v, lam)[0].backward(do)
        row = dict(spec=spec, tokens=B * S)
        for r in range(2):
            row.setdefault("do_bench", []).append(
                tt.do_bench(fn, warmup=50, rep=300, return_mode="median", grad_to_none=[q, k, v]))
            row.setdefault("do_bench_no_flush", []).append(no_flush(fn, [q, k, v]))
            row.setdefault("loop_grads_none", []).append(loop(fn, [q, k, v]))
            row.setdefault("loop_accumulate", []).append(loop(fn))
        rows.append({k: ([round(x, 4) if x else x for x in v] if isinstance(v, list) else v) for k, v in row.items()})
        print(json.dumps(rows[-1]), flush=True)
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["65536", "16x4096", "262144"])
