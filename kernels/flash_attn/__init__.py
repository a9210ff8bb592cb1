"""Softmax attention: `flash_attn` picks its implementation through `kernels.dispatch`.

Destinations: `flash_attn(..., out=)` and `flash_attn_backward(..., dq=, dk=, dv=, accumulate=)`
write the result into given tensors (views of larger buffers included: a caller that assembles one
tensor from several calls then needs no copy of its own). The Triton kernels store there directly;
the other implementations compute, then copy_/add_ (`_deliver`, one place for that fallback).

`flash_attn_merge_` serves one ring step: it attends and folds the block's result into a running
(out, lse) in place (inside the Triton kernel's epilogue where that kernel runs, so no separate
merge pass; elsewhere through (out, lse) of this block and the same formula in torch).

`seqpar.kernels.flash_attn` is this function (re-exported by `seqpar.kernels`); reach the
implementations as modules: `from seqpar.kernels.flash_attn.reference import flash_attn_reference`.
"""
from __future__ import annotations

import torch

from seqpar.kernels.dispatch import backend
from seqpar.kernels.flash_attn.reference import flash_attn_backward_reference, flash_attn_reference


def flash_attn(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
               softmax_scale=None, return_lse=False, out=None):
    """Attention of q `[B, Sq, Hq, D]` over k, v `[B, Sk, Hkv, D]` (Hq a multiple of Hkv).

    Packed documents: B = 1 and `cu_seqlens` (shared by q and k) or `cu_seqlens_q` + `cu_seqlens_k`
    (same number of documents, different lengths; causal aligned bottom-right, so in a document
    with Lq > Lk the first Lq - Lk queries see nothing). Returns out `[B, Sq, Hq, D]` in q's dtype,
    or (out, lse) with lse `[B, Hq, Sq]` in fp32 (fp64 for fp64 inputs), natural log, scale
    included, -inf for rows without a visible key.

    `out`: a tensor `[B, Sq, Hq, Dv]` of q's dtype (a view of a larger buffer is fine) that receives
    the result, which is then returned in place of a new tensor. No autograd through it (as torch's
    out= ops): differentiate with flash_attn_backward.
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if out is not None:
        _check_destination("out", out, (*q.shape[:3], v.shape[-1]), q.dtype)
        if needs_grad:
            raise RuntimeError("flash_attn(out=...) does not support autograd: call it under torch.no_grad() "
                               "(and use flash_attn_backward), or drop out= to get a differentiable result")
    impl = backend("flash_attn", q, k, v, return_lse=return_lse, cu_seqlens=cu_seqlens, causal=causal,
                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, needs_grad=needs_grad)
    if impl == "triton":
        from seqpar.kernels.flash_attn.triton import flash_attn_triton
        return flash_attn_triton(q, k, v, causal=causal, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                                 cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, return_lse=return_lse,
                                 out=out)
    if impl.startswith("aten_"):
        from seqpar.kernels.flash_attn.aten import attention_with_lse
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        result = attention_with_lse(q, k, v, kernel=impl[5:], causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                    softmax_scale=softmax_scale)
    elif impl == "split" and not return_lse:  # packed self-attention, differentiable (dispatch.split_applies)
        from seqpar.kernels.flash_attn.split import flash_attn_split
        result = flash_attn_split(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                  cu_seqlens=cu_seqlens if cu_seqlens is not None else cu_seqlens_q)
    elif impl == "split":  # with lse, no autograd (dispatch.task_split_applies): a ring step, a disagg server
        from seqpar.kernels.flash_attn.split_tasks import split_forward
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        return split_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             softmax_scale=softmax_scale, out=out)
    elif impl == "cudnn_graph":
        from seqpar.kernels.flash_attn.cudnn_graph import GraphAttn
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        result = GraphAttn.apply(q, k, v, causal, cu_q, cu_k, softmax_scale)
        result = result if return_lse else result[0]
    elif impl == "sdpa":
        from seqpar.kernels.flash_attn.sdpa import sdpa_attention
        result = sdpa_attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
    elif impl == "varlen":
        from seqpar.kernels.flash_attn.sdpa import varlen_attention
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        result = varlen_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal,
                                  softmax_scale=softmax_scale)
    else:
        result = flash_attn_reference(q, k, v, causal=causal, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                                      cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, return_lse=return_lse)
    if out is None:
        return result
    o, lse = result if isinstance(result, tuple) else (result, None)
    _deliver(out, o, False)
    return (out, lse) if return_lse else out


def flash_attn_backward(dout, q, k, v, out, lse, *, causal=True, cu_seqlens=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, softmax_scale=None, dq=None, dk=None, dv=None, accumulate=False):
    """(dq, dk, dv) of flash_attn from the upstream gradient `dout`, given `out` and `lse` `[B, Hq, Sq]`.

    `out` and `lse` may belong to a larger attention that this call is one block of (ring
    attention passes the merged ones); the result is then this block's share of the gradient.

    `dq`, `dk`, `dv`: tensors of q's, k's, v's shape and dtype (views are fine) that receive the
    gradients; each given one is returned in place of a new tensor. `accumulate=True` adds into
    `dk` and `dv` instead of overwriting them (key rows whose gradient several calls contribute);
    `dq` is always overwritten.
    """
    for name, dest, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if dest is not None:
            _check_destination(name, dest, like.shape, like.dtype)
    impl = backend("flash_attn_backward", q, k, v, causal=causal, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                   cu_seqlens_k=cu_seqlens_k)
    if impl == "triton":
        from seqpar.kernels.flash_attn.triton import flash_attn_backward_triton
        return flash_attn_backward_triton(dout, q, k, v, out, lse, causal=causal, cu_seqlens=cu_seqlens,
                                          cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                          softmax_scale=softmax_scale, dq=dq, dk=dk, dv=dv, accumulate=accumulate)
    if impl == "split":
        from seqpar.kernels.flash_attn.split_tasks import split_backward
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        return split_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              softmax_scale=softmax_scale, dq=dq, dk=dk, dv=dv, accumulate=accumulate)
    if impl == "cudnn_graph":
        from seqpar.kernels.flash_attn.cudnn_graph import attention_backward
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        grads = attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   softmax_scale=softmax_scale)
    elif impl.startswith("aten_"):
        from seqpar.kernels.flash_attn.aten import attention_backward
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        grads = attention_backward(dout, q, k, v, out, lse, kernel=impl[5:], causal=causal, cu_seqlens_q=cu_q,
                                   cu_seqlens_k=cu_k, softmax_scale=softmax_scale)
    else:
        grads = flash_attn_backward_reference(dout, q, k, v, out, lse, causal=causal, cu_seqlens=cu_seqlens,
                                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                              softmax_scale=softmax_scale)
    return tuple(g if dest is None else _deliver(dest, g, acc)
                 for g, dest, acc in zip(grads, (dq, dk, dv), (False, accumulate, accumulate)))


def _check_destination(name, dest, shape, dtype):
    if tuple(dest.shape) != tuple(shape) or dest.dtype != dtype:
        raise ValueError(f"{name}= must have shape {tuple(shape)} and dtype {dtype} (the result's), got "
                         f"{tuple(dest.shape)} {dest.dtype}; pass a view of that shape or drop {name}=")


def _deliver(dest, result, accumulate):
    """The fallback of every implementation that cannot store into a destination itself."""
    if accumulate:
        return dest.add_(result)
    return dest.copy_(result)


@torch.no_grad()
def flash_attn_merge_(q, k, v, out, lse, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      softmax_scale=None):
    """Attend q to this block's k, v and merge into the running `out` `[B, Sq, Hq, D]` (fp32 or q's
    dtype) and `lse` `[B, Hq, Sq]` (fp32; -inf where nothing was merged yet), in place:
    out <- (out e^lse + o e^l) / (e^lse + e^l), lse <- logaddexp(lse, l). Returns (out, lse).
    No autograd: differentiate with flash_attn_backward and the final (out, lse)."""
    impl = backend("flash_attn", q, k, v, return_lse=True, cu_seqlens=cu_seqlens, causal=causal,
                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if impl == "triton" and out.stride(-1) == 1 and lse.dtype == torch.float32:
        from seqpar.kernels.flash_attn import triton as flash_triton
        return flash_triton.flash_attn_merge_(q, k, v, out, lse, causal=causal, cu_seqlens=cu_seqlens,
                                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                              softmax_scale=softmax_scale)
    o, l = flash_attn(q, k, v, causal=causal, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, return_lse=True)
    from seqpar.kernels.attn_merge import attn_merge_
    return attn_merge_(out, o, lse, l, out)
