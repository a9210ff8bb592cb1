"""Issue 5 / 10: the Triton flash backward's dk/dv key tile at head dim 64, 64 keys (until
2026-11-27) against 128 (`table_blocks`: each of the two warpgroups then owns 64 keys instead of
half of every inner block). One H100 (~3 min):

    SEQPAR_TUNE_CACHE=0 python3 docs/benchmarks/flash_dkdv_gpu.py OUT.json

Why: llama_1b's disagg servers (32/8 heads, D = 64) spent 1107 of 1346 ms of a step's Triton time in
the backward, 776 of it in the dk/dv kernel (2026-11-27-gpu-14th/call2, step 9, rank 0), which does
4 of the backward's 7 matmuls but ran 2.3x the dq kernel's time; a Triton pair cost 1.9 cuDNN pairs
there in the backward against 1.1 in the forward, and that difference is what leaves each direction
imbalanced under one plan. Cases at llama_1b's heads: packed rows of the anchor's lognormal lengths
(16k, 64k), one dense 16k row, and one piece over a prefix as the servers run them (8k queries over
56k keys, causal bottom-right). Causal fwd+bwd TFLOP/s over the useful pairs, each tile's kernel
times (torch.profiler), the largest gradient difference between the tiles, and SDPA cuDNN on the
dense row (K/V expanded to the query heads, as the split hands it cuDNN) for the Triton/cuDNN ratio
the disagg planner weighs (`parallel.disagg.triton_cost`). D = 128 rows check nothing changed there.
The tuning cache must be off: both tiles share a tuning key.
"""
import json
import sys

import torch

from seqpar.bench._flash_cases import _bench, _kernel_ms, _tuned, case_inputs
from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn import triton as ft

TABLE_BLOCKS = ft.table_blocks


def _use_tile(tile):
    """Run the dk/dv kernel with `tile` keys at D <= 64 (None: the module's choice), tuned afresh."""
    ft.table_blocks = TABLE_BLOCKS if tile is None else (
        lambda d: (TABLE_BLOCKS(d)[0], tile if d <= 64 else TABLE_BLOCKS(d)[1]))
    ft._attn_bwd_dkdv.cache = {}  # the autotuner's picks (and the launcher's) are per tuning key


def _prefix_inputs(nq, nk, device, hq, hkv, hd):
    gen = torch.Generator(device=device).manual_seed(nk)
    q, do = (torch.randn(1, nq, hq, hd, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, nk, hkv, hd, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(2))
    for t in (q, k, v):
        t.requires_grad_()
    useful = 2 * hq * hd * (nq * (nk - nq) + nq * (nq + 1) // 2)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=device) for n in (nq, nk))
    return q, k, v, do, useful, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def _case(layout, S, hq, hkv, hd, device):
    """(q, k, v, dout, useful FLOPs, the Triton kernel's call) of a dense, packed or prefix case."""
    if layout == "prefix":
        q, k, v, do, useful, cu = _prefix_inputs(*S, device, hq, hkv, hd)
    else:
        lens = None if layout == "dense" else lognormal_lengths(S)
        q, k, v, do, useful, c = case_inputs(S, lens, device, hq, hkv, hd)
        cu = dict(cu_seqlens=c)
    return q, k, v, do, useful, (lambda q, k, v: ft.flash_attn_triton(q, k, v, causal=True, **cu))


def _cudnn(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[2] // k.shape[2]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q.transpose(1, 2), *(t.repeat_interleave(g, 2).transpose(1, 2)
                                                                   for t in (k, v)), is_causal=True).transpose(1, 2)


def main(out_path):
    device = torch.device("cuda")
    timer = _bench(device)
    rows = []
    cases = [("packed", 65536, 32, 8, 64), ("packed", 16384, 32, 8, 64), ("dense", 16384, 32, 8, 64),
             ("prefix", (8192, 57344), 32, 8, 64), ("packed", 16384, 32, 32, 128), ("dense", 16384, 32, 32, 128)]
    for layout, S, hq, hkv, hd in cases:
        q, k, v, do, useful, fn = _case(layout, S, hq, hkv, hd, device)
        grads = {}
        for tile in ((64, 128) if hd <= 64 else (None,)):
            _use_tile(tile)
            grads[tile] = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            ms = timer(lambda: fn(q, k, v).backward(do), [q, k, v])
            row = dict(kernel="seqpar_triton", key_tile=tile or ft.table_blocks(hd)[1], layout=layout, S=S,
                       heads=(hq, hkv, hd), fwdbwd_ms=round(ms, 3), fwdbwd_tflops=round(3.5 * useful / ms / 1e9, 1),
                       kernels_ms=_kernel_ms(fn, q, k, v, do), dkdv_picks=_tuned(compact=True)["bwd_dkdv"])
            if tile == 128:
                row["max_abs_diff_vs_64"] = {n: (a.float() - b.float()).abs().max().item()
                                             for n, a, b in zip(("dq", "dk", "dv"), grads[128], grads[64])}
            rows.append(row)
            print(row, flush=True)
        _use_tile(None)
        if layout == "dense":
            fms = timer(lambda: _cudnn(q, k, v))
            ms = timer(lambda: _cudnn(q, k, v).backward(do), [q, k, v])
            rows.append(dict(kernel="sdpa_cudnn", layout=layout, S=S, heads=(hq, hkv, hd), fwd_ms=round(fms, 3),
                             fwdbwd_ms=round(ms, 3), fwdbwd_tflops=round(3.5 * useful / ms / 1e9, 1),
                             kernels_ms=_kernel_ms(lambda q, k, v: _cudnn(q, k, v), q, k, v, do)))
            print(rows[-1], flush=True)
    json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows),
              open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
