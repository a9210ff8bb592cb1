"""Issue 5: the Triton flash backward's dk/dv kernel fused (one launch, dk and dv accumulators
both live) against split (SEQPAR_FLASH_DKDV=split: a dv launch, then a dk launch, one accumulator
each as the dq kernel has, for one more QK^T). One H100 (~4 min):

    python3 docs/benchmarks/flash_dkdv_gpu.py OUT.json

Why: at dense 16k (2026-11-26, `2026-11-26-4xh100-tails/flash_default_h100.json`) the dk/dv kernel
took 10.37 of the backward's 15.3 ms, 424 TFLOP/s over its four matmuls, where the dq kernel ran its
three at ~675. Causal fwd+bwd TFLOP/s (useful FLOPs, 3.5x the forward's 2 S^2 H D), bf16, H=32,
D=128, dense and packed (the anchor's lognormal lengths), and packed 64k at llama_1b's heads (GQA
32/8, D=64); each mode's kernel times (torch.profiler), the largest difference of its gradients
from the fused ones, and SDPA cuDNN / FlexAttention in the same run (the dense 16k goal is 400
TFLOP/s, the packed 16k one 1.3x Flex's document mask).
"""
import json
import os
import sys

import torch

from seqpar.bench._flash_cases import _bench, _impls, _kernel_ms, case_inputs
from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn.triton import DKDV_ENV, flash_attn_triton


def main(out_path):
    device = torch.device("cuda")
    timer = _bench(device)
    rows = []
    # (layout, S, query heads, kv heads, head dim): the kernels bench's shapes, then llama_1b's heads
    # (32 / 8 of 64), whose disagg servers spent 70% of their Triton backward in the dk/dv kernel
    # (2026-11-26 ninth session, call 7: 1658 of 2365 ms)
    cases = [("dense", 16384, 32, 32, 128), ("dense", 65536, 32, 32, 128), ("packed", 16384, 32, 32, 128),
             ("packed", 65536, 32, 32, 128), ("packed", 65536, 32, 8, 64)]
    for layout, S, hq, hkv, hd in cases:
        lens = None if layout == "dense" else lognormal_lengths(S)
        q, k, v, do, useful, cu = case_inputs(S, lens, device, hq, hkv, hd)
        grads = {}
        for mode in ("fused", "split"):
            os.environ[DKDV_ENV] = mode
            fn = lambda q, k, v: flash_attn_triton(q, k, v, causal=True, cu_seqlens=cu)  # noqa: E731
            grads[mode] = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            ms = timer(lambda: fn(q, k, v).backward(do), [q, k, v])
            row = dict(kernel=f"seqpar_triton_{mode}", layout=layout, S=S, heads=(hq, hkv, hd), fwdbwd_ms=round(ms, 3),
                       fwdbwd_tflops=round(3.5 * useful / ms / 1e9, 1), kernels_ms=_kernel_ms(fn, q, k, v, do))
            if mode == "split":
                row["max_abs_diff_vs_fused"] = {n: (a.float() - b.float()).abs().max().item()
                                                for n, a, b in zip(("dq", "dk", "dv"), grads["split"], grads["fused"])}
            rows.append(row)
            print(row, flush=True)
        os.environ.pop(DKDV_ENV)
        if S == 16384 and hd == 128:  # the goals' anchors, measured beside the two modes
            for name, fn in _impls(S, lens, device).items():
                if name in ("sdpa_cudnn", "flex_causal", "flex_docmask"):
                    ms = timer(lambda: fn(q, k, v).backward(do), [q, k, v])
                    rows.append(dict(kernel=name, layout=layout, S=S, fwdbwd_ms=round(ms, 3),
                                     fwdbwd_tflops=round(3.5 * useful / ms / 1e9, 1)))
                    print(rows[-1], flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows),
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
