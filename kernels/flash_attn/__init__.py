"""Softmax attention: `flash_attn` picks its implementation through `kernels.dispatch`.

`seqpar.kernels.flash_attn` is this function (re-exported by `seqpar.kernels`); reach the
implementations as modules: `from seqpar.kernels.flash_attn.reference import flash_attn_reference`.
"""
from __future__ import annotations

import torch

from seqpar.kernels.dispatch import backend
from seqpar.kernels.flash_attn.reference import flash_attn_backward_reference, flash_attn_reference


def flash_attn(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
               softmax_scale=None, return_lse=False):
    """Attention of q `[B, Sq, Hq, D]` over k, v `[B, Sk, Hkv, D]` (Hq a multiple of Hkv).

    Packed documents: B = 1 and `cu_seqlens` (shared by q and k) or `cu_seqlens_q` + `cu_seqlens_k`
    (same number of documents, different lengths; causal aligned bottom-right, so in a document
    with Lq > Lk the first Lq - Lk queries see nothing). Returns out `[B, Sq, Hq, D]` in q's dtype,
    or (out, lse) with lse `[B, Hq, Sq]` in fp32 (fp64 for fp64 inputs), natural log, scale
    included, -inf for rows without a visible key.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    impl = backend("flash_attn", q, k, v, return_lse=return_lse, cu_seqlens=cu_seqlens, causal=causal,
                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, needs_grad=needs_grad)
    if impl.startswith("aten_"):
        from seqpar.kernels.flash_attn.aten import attention_with_lse
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        return attention_with_lse(q, k, v, kernel=impl[5:], causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                  softmax_scale=softmax_scale)
    if impl == "sdpa":
        from seqpar.kernels.flash_attn.sdpa import sdpa_attention
        return sdpa_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    if impl == "varlen":
        from seqpar.kernels.flash_attn.sdpa import varlen_attention
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        return varlen_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal,
                                softmax_scale=softmax_scale)
    return flash_attn_reference(q, k, v, causal=causal, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                                cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, return_lse=return_lse)


def flash_attn_backward(dout, q, k, v, out, lse, *, causal=True, cu_seqlens=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, softmax_scale=None):
    """(dq, dk, dv) of flash_attn from the upstream gradient `dout`, given `out` and `lse` `[B, Hq, Sq]`.

    `out` and `lse` may belong to a larger attention that this call is one block of (ring
    attention passes the merged ones); the result is then this block's share of the gradient.
    """
    impl = backend("flash_attn_backward", q, k, v, causal=causal, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    if impl.startswith("aten_"):
        from seqpar.kernels.flash_attn.aten import attention_backward
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        return attention_backward(dout, q, k, v, out, lse, kernel=impl[5:], causal=causal, cu_seqlens_q=cu_q,
                                  cu_seqlens_k=cu_k, softmax_scale=softmax_scale)
    return flash_attn_backward_reference(dout, q, k, v, out, lse, causal=causal, cu_seqlens=cu_seqlens,
                                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                         softmax_scale=softmax_scale)
