"""Sequence-parallel attention: the model calls `softmax_attention` / `linear_attention` with an
`AttnContext`; the method named there runs over the context's cp group.

The registries below are the single list of implemented methods: config validation reads them.
"""
from __future__ import annotations

from seqpar import kernels
from seqpar.attention.allgather import allgather_attention
from seqpar.attention.context import AttnContext
from seqpar.attention.disagg import disagg_attention
from seqpar.attention.lasp import lasp2_attention
from seqpar.attention.lasp1 import lasp1_attention
from seqpar.attention.ring import ring_attention
from seqpar.attention.ulysses import ulysses_attention, usp_attention

SOFTMAX_SP = {"allgather": allgather_attention, "ring": ring_attention, "ulysses": ulysses_attention,
              "usp": usp_attention, "disagg": disagg_attention}
LINEAR_SP = {"lasp2": lasp2_attention, "lasp1": lasp1_attention}


def softmax_attention(q, k, v, ctx: AttnContext, *, softmax_scale=None):
    ctx = ctx.for_softmax()
    if ctx.cp_size == 1:
        return kernels.flash_attn(q, k, v, causal=True, cu_seqlens=ctx.cu_seqlens, softmax_scale=softmax_scale)
    return SOFTMAX_SP[ctx.softmax_sp](q, k, v, group=ctx.group, causal=True, cu_seqlens=ctx.cu_seqlens,
                                      softmax_scale=softmax_scale, layout=ctx.layout)


def linear_attention(q, k, v, log_decay, ctx: AttnContext, *, scale=None):
    if ctx.cp_size == 1:
        o, _ = kernels.lightning_attn(q, k, v, log_decay, scale=scale, cu_seqlens=ctx.cu_seqlens)
        return o
    # the state scan is lasp2's choice; lasp1 is a sequential ring of states by definition
    extra = {"scan": ctx.linear_scan} if ctx.linear_sp == "lasp2" else {}
    return LINEAR_SP[ctx.linear_sp](q, k, v, log_decay=log_decay, group=ctx.group, cu_seqlens=ctx.cu_seqlens,
                                    scale=scale, layout=ctx.layout, **extra)


__all__ = ["AttnContext", "softmax_attention", "linear_attention", "allgather_attention", "disagg_attention",
           "ring_attention", "ulysses_attention", "usp_attention", "lasp2_attention", "lasp1_attention", "SOFTMAX_SP",
           "LINEAR_SP"]
