"""Softmax attention over the cp group by all-gathering K and V (Llama 3's context parallelism).

Every rank gathers the whole K/V row once, then attends its own query chunks to the keys they
can see. Exact in forward and backward (the gather's backward sums dK/dV over ranks). It moves
all of K/V and holds it whole, which is why ring attention exists; it stays as the simple,
always-correct baseline `parallel.softmax_sp=allgather`.
"""
from __future__ import annotations

import torch

from seqpar import kernels
from seqpar.parallel.sharding import group_size_rank, local_ranges, unshard_sequence


def allgather_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="zigzag"):
    world, rank = group_size_rank(group)
    B, s_local = q.shape[:2]
    seq_len = s_local * world
    k_full = unshard_sequence(k, group, layout=layout)
    v_full = unshard_sequence(v, group, layout=layout)
    if cu_seqlens is None:  # equal-length rows are documents of one packed row
        cu_seqlens = torch.arange(0, B * seq_len + 1, seq_len, dtype=torch.int32, device=q.device)
        q, k_full, v_full = (t.reshape(1, B * t.shape[1], *t.shape[2:]) for t in (q, k_full, v_full))
    bounds = cu_seqlens.tolist()
    outs, offset = [], 0
    for row in range(B):
        for start, end in local_ranges(seq_len, world, rank, layout):
            a, b = start + row * seq_len, end + row * seq_len
            q_piece = q[:, offset:offset + (b - a)]
            offset += b - a
            outs.append(_attend_range(q_piece, k_full, v_full, a, b, bounds, causal, softmax_scale))
    out = torch.cat(outs, dim=1)
    return out.reshape(B, s_local, *out.shape[2:])


def _attend_range(q, k, v, a, b, bounds, causal, softmax_scale):
    """Queries [a, b) of the packed row against the keys of their documents."""
    cu_q, cu_k, k_slices = [0], [0], []
    for ds, de in zip(bounds[:-1], bounds[1:]):
        if de <= a or ds >= b:
            continue
        k_end = min(b, de) if causal else de
        cu_q.append(cu_q[-1] + min(b, de) - max(a, ds))
        cu_k.append(cu_k[-1] + k_end - ds)
        k_slices.append((ds, k_end))
    k_sel = torch.cat([k[:, s:e] for s, e in k_slices], dim=1)
    v_sel = torch.cat([v[:, s:e] for s, e in k_slices], dim=1)
    as_tensor = lambda c: torch.tensor(c, dtype=torch.int32, device=q.device)
    return kernels.flash_attn(q, k_sel, v_sel, causal=causal, cu_seqlens_q=as_tensor(cu_q),
                              cu_seqlens_k=as_tensor(cu_k), softmax_scale=softmax_scale)
