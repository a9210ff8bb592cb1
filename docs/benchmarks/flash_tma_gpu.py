"""Issue 5 / 10: the Triton flash kernels' inner blocks loaded through TMA descriptors (SEQPAR_TMA=1;
SEQPAR_FLASH_TMA=1 when it ran: k, v in the forward and dq kernels, q, dout in the dk/dv kernel; a
block past the document reads zeros, no masks) against pointer loads, and a sweep of dk/dv configs
at head dim 64 (llama_1b's 32/8 heads, where the dk/dv kernel ran at half the dq kernel's rate per
matmul, 2026-11-27-gpu-14th). One H100 (~4 min):

    SEQPAR_TUNE_CACHE=0 python3 docs/benchmarks/flash_tma_gpu.py OUT.json

Rows: causal fwd+bwd TFLOP/s over the useful pairs, each kernel's ms (torch.profiler), the
autotuners' picks, and the largest gradient difference against pointer loads.
"""
import json
import os
import sys

import torch
import triton

from seqpar.bench._flash_cases import _bench, _kernel_ms, _tuned
from seqpar.kernels.flash_attn import triton as ft

sys.path.insert(0, os.path.dirname(__file__))
from flash_dkdv_gpu import _case  # noqa: E402

KERNELS = (ft._attn_fwd, ft._attn_bwd_dkdv, ft._attn_bwd_dq)
DKDV_CONFIGS = ft._attn_bwd_dkdv.configs
# (key block, query block, warps, stages, SPLIT) at D = 64, 128 keys as the tile table fixes them
SWEEP = [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 64, 8, 2, False), (128, 32, 4, 3, False),
         (128, 32, 4, 4, False), (128, 32, 4, 5, False), (128, 32, 8, 3, False), (128, 64, 4, 3, False),
         (128, 16, 4, 4, False), (128, 64, 8, 2, True), (128, 64, 8, 3, True), (128, 32, 4, 3, True)]


def _mode(tma):
    os.environ["SEQPAR_TMA"] = "1" if tma else "0"
    for kernel in KERNELS:
        kernel.cache = {}  # picks afresh (Tuned's setattr forgets its own too)


def main(out_path):
    device = torch.device("cuda")
    timer = _bench(device)
    rows = []
    cases = [("packed", 65536, 32, 8, 64), ("prefix", (8192, 57344), 32, 8, 64), ("packed", 16384, 32, 8, 64),
             ("dense", 16384, 32, 8, 64), ("dense", 16384, 32, 32, 128), ("packed", 16384, 32, 32, 128),
             ("packed", 65536, 32, 32, 128)]
    for layout, S, hq, hkv, hd in cases:
        q, k, v, do, useful, fn = _case(layout, S, hq, hkv, hd, device)
        grads = {}
        for tma in (False, True):
            _mode(tma)
            grads[tma] = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            ms = timer(lambda: fn(q, k, v).backward(do), [q, k, v])
            row = dict(tma=tma, layout=layout, S=S, heads=(hq, hkv, hd), fwdbwd_ms=round(ms, 3),
                       fwdbwd_tflops=round(3.5 * useful / ms / 1e9, 1), kernels_ms=_kernel_ms(fn, q, k, v, do),
                       picks=_tuned(compact=True))
            if tma:
                row["max_abs_diff_vs_pointers"] = {n: (a.float() - b.float()).abs().max().item()
                                                   for n, a, b in zip(("dq", "dk", "dv"), grads[True], grads[False])}
            rows.append(row)
            print(row, flush=True)
    # dk/dv configs one at a time (a single config skips tuning and the prune)
    for layout, S in (("packed", 65536), ("prefix", (8192, 57344))):
        q, k, v, do, useful, fn = _case(layout, S, 32, 8, 64, device)
        for tma in (False, True):
            _mode(tma)
            for a, b, w, st, split in SWEEP:
                ft._attn_bwd_dkdv.configs = [triton.Config({"BLOCK_N": a, "BLOCK_M": b, "SPLIT": split},
                                                           num_warps=w, num_stages=st)]
                try:
                    fn(q, k, v).backward(do)
                    km = _kernel_ms(fn, q, k, v, do)
                    dkdv = sum(t for name, t in km.items() if "dkdv" in name)
                    rows.append(dict(sweep=True, tma=tma, layout=layout, S=S, config=(a, b, w, st, split),
                                     dkdv_ms=round(dkdv, 3)))
                except Exception as e:  # out of shared memory, a compile failure: noted, the sweep goes on
                    rows.append(dict(sweep=True, tma=tma, layout=layout, S=S, config=(a, b, w, st, split),
                                     error=f"{type(e).__name__}: {str(e)[:200]}"))
                print(rows[-1], flush=True)
        ft._attn_bwd_dkdv.configs = DKDV_CONFIGS
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                   rows=rows), open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
