"""Pieces over a prefix (a disagg server's tasks) on cuDNN in chunks against the Triton kernel (one GPU, ~1 min).

    python docs/benchmarks/prefix_chunks_gpu.py OUT.json

Issue 10: one task call (`flash_attn` with separate query and key boundaries and the lse, then
`flash_attn_backward`), bf16 at llama_1b's heads (32/8 x 64), for pieces of n queries over m keys
from the e2e runs' plans: on the Triton kernel (SEQPAR_CUDNN_PREFIX=0) and on cuDNN with prefix
chunks of 4096, 8192 and 16384 keys (SEQPAR_CUDNN_PREFIX=1, SEQPAR_CUDNN_PREFIX_CHUNK); beside them
causal squares, what a long document on cuDNN costs a pair. Median ms by triton's do_bench (its
warm-up builds the shapes' cuDNN plans), fwd and fwd+bwd, and ms per billion score pairs
(2026-11-28-gpu-28th/call4 ran an earlier form: the median of 5 CUDA-event timings after a warm-up).
"""
import json
import os
import sys

import torch
from triton.testing import do_bench

from seqpar.attention.disagg.planner import pairs
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward

H, HKV, D = 32, 8, 64
PIECES = [(4096, 16384), (4096, 65536), (8192, 40000), (10956, 64706), (12437, 65536), (16689, 65536),
          (7028, 42364), (5869, 41205)]
SQUARES = [8192, 16384, 32768, 49152]
VARIANTS = [("triton", "0", ""), ("chunk4096", "1", "4096"), ("chunk8192", "1", "8192"), ("chunk16384", "1", "16384")]
dev = torch.device("cuda")


def timed(n, m):
    g = torch.Generator(device=dev).manual_seed(n + m)
    q, do = (torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, m, HKV, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    cu_q, cu_k = torch.tensor([0, n], dtype=torch.int32, device=dev), torch.tensor([0, m], dtype=torch.int32, device=dev)
    kw = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)

    def fwd():
        return flash_attn(q, k, v, return_lse=True, **kw)

    def both():
        o, lse = fwd()
        flash_attn_backward(do, q, k, v, o, lse, **kw)
    out = {name: do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in (("fwd_ms", fwd), ("ms", both))}
    out["ms_per_gpair"] = out["ms"] / pairs(m - n, m, 0) * 1e9
    return out


rows = []
for name, prefix, chunk in VARIANTS:
    os.environ["SEQPAR_CUDNN_PREFIX"], os.environ["SEQPAR_CUDNN_PREFIX_CHUNK"] = prefix, chunk
    for n, m in PIECES:
        rows.append({"variant": name, "q_len": n, "kv_len": m, **timed(n, m)})
        print(json.dumps(rows[-1]), flush=True)
for L in SQUARES:
    rows.append({"variant": "square", "q_len": L, "kv_len": L, **timed(L, L)})
    print(json.dumps(rows[-1]), flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"rows": rows, "device": torch.cuda.get_device_name(), "heads": [H, HKV, D]}, f, indent=1)
