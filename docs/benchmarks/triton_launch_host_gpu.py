"""Host microseconds per launch of the lightning kernels (issue 4: LASP-2 at 32k tokens per GPU is bound by
its host, and `lasp_host_parts_gpu.py` put ~170 us on each of the kernel's 8 launches per fwd+bwd). One GPU,
one row of LOCAL_TOKENS tokens, H=32, D=128, bf16; each figure the mean over 200 calls (the GPU never waits
on the host here: nothing is synchronised inside the loop), in microseconds:
- `_output` whole (the output pass as the kernel's forward calls it), with TMA (the default) and without;
- its parts: `use_tma`, `torch.empty` of the output, `Tuned.run` (seqpar's autotune fast path) and
  `JITFunction.run` with the picked config (Triton's own launch path);
- a trivial Triton kernel with 4 arguments and with 40 (the per-argument cost of Triton's binder).

    python docs/benchmarks/triton_launch_host_gpu.py OUT.json [LOCAL_TOKENS]
    python docs/benchmarks/triton_launch_host_gpu.py --profile OUT.txt [LOCAL_TOKENS]
"""
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

from seqpar.kernels.lightning_attn import triton as lt
from seqpar.kernels.tma import use_tma


@triton.jit
def _tiny4(x_ptr, n, a, b, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + a + b, mask=i < n)


@triton.jit
def _tiny40(x_ptr, n, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, b0, b1, b2, b3, b4, b5, b6, b7, b8, b9,
            c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, d0, d1, d2, d3, d4, d5, d6, d7, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + a0 + d7, mask=i < n)


def _us(fn, n=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) * 1e6 / n
    torch.cuda.synchronize()
    return round(host, 2)


def main(out, local):
    dev = torch.device("cuda")
    H, D = 32, 128
    q, k, v = (torch.randn(local, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    seg = lt.segment_length(local, H, dev)
    tab = lt.segment_table(None, 1, local, seg, dev)
    bound = lt._boundary_states(k, v, tab, lam, 1.0, False)
    res = {"local_tokens": local, "seg_len": seg, "device": torch.cuda.get_device_name(), "triton": triton.__version__}

    def output():
        return lt._output(q, k, v, bound, bound.stride(), None, None, None, tab, lam, (0.1, 0.1, 1.0), False, q.dtype)

    res["_output_whole_tma"] = _us(output)
    os.environ["SEQPAR_TMA"] = "0"
    res["_output_whole_no_tma"] = _us(output)
    del os.environ["SEQPAR_TMA"]
    res["use_tma"] = _us(lambda: use_tma(q, k, v, default_on=True))
    res["torch_empty"] = _us(lambda: torch.empty(local, H, D, device=dev, dtype=torch.bfloat16))
    o = torch.empty_like(q)
    segs, _, _, n_max, _ = tab
    dot, prec = lt._dot_types(q.dtype)
    args = (q, k, v, o, bound, bound, bound, segs, lam, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
            *o.stride()[:2], *bound.stride(), 0, 0, 0, 0, H, 0.1, 0.1, 1.0)
    meta = dict(C=lt.CHUNK, REVERSE=False, DOT=dot, PRECISION=prec, HAS_EDGE_IN=False, STORE_EDGE_OUT=False,
                TMA=use_tma(q, k, v), **lt._dims(D, D))
    grid = lambda m: (n_max * H * m["Z_SPLIT"],)  # noqa: E731
    res["Tuned.run"] = _us(lambda: lt._segment_output[grid](*args, **meta))
    picked = next(iter(lt._segment_output._picks.values()))
    fn = lt._segment_output.tuner.fn
    res["JITFunction.run"] = _us(lambda: fn[grid](*args, **meta, **picked))
    x = torch.zeros(1024, device=dev)
    res["tiny_4_args"] = _us(lambda: _tiny4[(1,)](x, 1000, 1.0, 2.0, BLOCK=1024))
    res["tiny_40_args"] = _us(lambda: _tiny40[(1,)](x, 1000, *range(1, 39), BLOCK=1024))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))




def profile_output(out, local):
    """cProfile of 300 `_output` calls with TMA and without, top functions by own time (where the TMA
    launch's extra host time goes)."""
    import cProfile
    import io
    import pstats
    dev = torch.device("cuda")
    H, D = 32, 128
    q, k, v = (torch.randn(local, H, D, device=dev, dtype=torch.bfloat16) for _ in range(3))
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    tab = lt.segment_table(None, 1, local, lt.segment_length(local, H, dev), dev)
    bound = lt._boundary_states(k, v, tab, lam, 1.0, False)
    text = {}
    for tma in ("1", "0"):
        os.environ["SEQPAR_TMA"] = tma
        for _ in range(20):
            lt._output(q, k, v, bound, bound.stride(), None, None, None, tab, lam, (0.1, 0.1, 1.0), False, q.dtype)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            lt._output(q, k, v, bound, bound.stride(), None, None, None, tab, lam, (0.1, 0.1, 1.0), False, q.dtype)
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        text[f"tma{tma}"] = s.getvalue()
    del os.environ["SEQPAR_TMA"]
    with open(out, "w") as f:
        for name, t in text.items():
            f.write(f"===== {name}\n{t}\n")
    print(open(out).read()[-9000:])


if __name__ == "__main__":
    if sys.argv[1] == "--profile":
        profile_output(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 32768)
    else:
        main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768)
