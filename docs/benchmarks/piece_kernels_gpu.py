"""Issue 10: each direction of the kernels a disagg server can run its tasks on, at llama_1b's
heads (32/8, D = 64), one H100 (~2 min):

    python3 docs/benchmarks/piece_kernels_gpu.py OUT.json

The servers run pieces over a prefix (causal, bottom-right) and short whole documents on seqpar's
Triton kernel, whose backward costs 1.6-1.9 cuDNN score pairs against ~1.1 forward (2026-11-27-gpu-14th
call 2); one plan then leaves each direction unbalanced. FlashAttention-2 (torch's aten varlen ops)
takes the same tasks (bottom-right causal, GQA, lse), so if its backward beat Triton's there the
split could send the backward's Triton work to it. Per case and family: forward and backward
kernel ms (torch.profiler, per call), the largest gradient difference against Triton's.
"""
import json
import sys

import torch

from seqpar.bench._flash_cases import case_inputs
from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn import aten
from seqpar.kernels.flash_attn import triton as ft


def _prefix(nq, nk, device, hq, hkv, hd):
    gen = torch.Generator(device=device).manual_seed(nk)
    q, do = (torch.randn(1, nq, hq, hd, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, nk, hkv, hd, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=device) for n in (nq, nk))
    return q, k, v, do, cu_q, cu_k


def _families(q, k, v, cu_q, cu_k):
    """name -> (forward() -> (out, lse), backward(do, out, lse) -> grads)."""
    tri = (lambda: ft.attention_forward(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)[:2],
           lambda do, o, l: ft.attention_backward(do, q, k, v, o, l, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k))
    fa2 = (lambda: aten.attention_with_lse(q, k, v, kernel="flash", causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k),
           lambda do, o, l: aten.attention_backward(do, q, k, v, o, l, kernel="flash", causal=True,
                                                    cu_seqlens_q=cu_q, cu_seqlens_k=cu_k))
    out = {"triton": tri, "fa2": fa2}
    if cu_q is None:  # one dense row: cuDNN, K/V expanded to the query heads as the split hands it
        g = q.shape[2] // k.shape[2]
        ke, ve = (t.repeat_interleave(g, 2).contiguous() for t in (k, v))
        out["cudnn"] = (lambda: aten.attention_with_lse(q, ke, ve, kernel="cudnn", causal=True),
                        lambda do, o, l: aten.attention_backward(do, q, ke, ve, o, l, kernel="cudnn", causal=True))
    return out


def _ms(fn, reps=10):
    """Median GPU ms of fn over reps calls (CUDA events; the calls queue back to back)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main(out_path):
    device = torch.device("cuda")
    hq, hkv, hd = 32, 8, 64
    cases = [("prefix 8k over 56k", _prefix(8192, 57344, device, hq, hkv, hd)),
             ("prefix 2k over 30k", _prefix(2048, 30720, device, hq, hkv, hd))]
    for name, S, lens in (("packed 16k", 16384, lognormal_lengths(16384)), ("packed 64k", 65536, lognormal_lengths(65536)),
                          ("dense 16k", 16384, None)):
        q, k, v, do, _, cu = case_inputs(S, lens, device, hq, hkv, hd)
        cases.append((name, (q.detach(), k.detach(), v.detach(), do, cu, cu)))
    rows = []
    for name, (q, k, v, do, cu_q, cu_k) in cases:
        fams = _families(q, k, v, cu_q, cu_k)
        ref = None
        for _ in range(2):  # rounds: every family once per round, in turn
            for fam, (fwd, bwd) in fams.items():
                o, lse = fwd()
                grads = bwd(do, o, lse)
                if fam == "triton":
                    ref = grads
                diff = {n: (a.float() - b.float()).abs().max().item() for n, a, b in zip("qkv", grads, ref)} \
                    if fam != "cudnn" else None
                row = dict(case=name, family=fam, fwd_ms=round(_ms(fwd), 3), bwd_ms=round(_ms(lambda: bwd(do, o, lse)), 3),
                           max_abs_diff_vs_triton=diff)
                row["bwd_over_fwd"] = round(row["bwd_ms"] / row["fwd_ms"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, heads=(hq, hkv, hd), rows=rows),
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
