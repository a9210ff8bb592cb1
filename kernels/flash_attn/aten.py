"""flash_attn with its log-sum-exp, and its backward from a given (out, lse), through torch's aten ops.

Partial attention that is merged later (ring attention) needs the lse of each block and, in the
backward, the block's gradient computed against the MERGED out and lse. The public SDPA and
varlen_attn entry points give neither, so this module calls the ops behind them:

- ``flash``: ``aten._flash_attention_forward/_backward`` (FlashAttention-2 inside torch). Dense
  rows ``[B, S, H, D]`` or packed documents ``[T, H, D]`` with cu_seqlens; GQA natively; causal
  masks aligned bottom-right, as the reference does. lse: ``[B, H, S]`` dense, ``[H, T]`` packed.
- ``cudnn``: ``aten._scaled_dot_product_cudnn_attention`` and its backward, dense rows only,
  equal head counts (the dispatch never sends GQA here). Its lse shape differs between torch
  versions (``[B, H, S]`` or ``[B, H, S, 1]``); the shape is learnt once from the op's meta kernel.

lse here is always in the reference's layout, ``[B, H, Sq]`` fp32, whatever the kernel's own is.
Forward outputs carry no autograd graph: callers run these under their own autograd.Function
(`kernels.dispatch` sends calls that need gradients to the reference instead).
Only for CUDA tensors in fp16/bf16; checked against the fp64 reference in tests/test_ring.py (gpu).
"""
from __future__ import annotations

from functools import lru_cache

import torch

aten = torch.ops.aten


def attention_with_lse(q, k, v, *, kernel, causal, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None):
    """(out `[B, Sq, Hq, D]`, lse `[B, Hq, Sq]` fp32) of attention over one block."""
    if cu_seqlens_q is not None:
        cu_q, cu_k, max_q, max_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k)
        out, lse, *_ = aten._flash_attention_forward(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, 0.0, causal,
                                                     False, scale=softmax_scale)
        if lse.shape != (q.shape[2], q.shape[1]):  # older flash builds padded lse per document
            raise RuntimeError(f"unexpected varlen flash lse shape {tuple(lse.shape)}; expected (H, total_q)")
        return out.unsqueeze(0), _blind_rows_neg_inf(lse).unsqueeze(0)
    B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
    if kernel == "cudnn":
        q_, k_, v_ = (canonical_strides(t).transpose(1, 2) for t in (q, k, v))
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q_, k_, v_, None, True, 0.0, causal, False,
                                                                scale=softmax_scale)
        return out.transpose(1, 2), lse.reshape(B, q.shape[2], Sq)
    out, lse, *_ = aten._flash_attention_forward(q, k, v, None, None, Sq, Sk, 0.0, causal, False, scale=softmax_scale)
    return out, _blind_rows_neg_inf(lse)


def _blind_rows_neg_inf(lse):
    # FlashAttention-2 writes lse = +inf for a row that sees no key (a document with fewer keys
    # than queries); the reference's -inf is what merging partial results needs.
    return lse.masked_fill(lse == float("inf"), float("-inf"))


def attention_backward(dout, q, k, v, out, lse, *, kernel, causal, cu_seqlens_q=None, cu_seqlens_k=None,
                       softmax_scale=None):
    """(dq, dk, dv) of one block given the (merged) out and lse in the reference layout."""
    dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
    # A strided lse gives wrong gradients in these kernels (torch's context_parallel notes the same).
    lse = lse.float()
    rng, unused = _no_dropout_state(q.device)
    if cu_seqlens_q is not None:
        cu_q, cu_k, max_q, max_k = _varlen_args(q, cu_seqlens_q, cu_seqlens_k)
        dq, dk, dv = aten._flash_attention_backward(dout[0], q[0], k[0], v[0], out[0], lse[0].contiguous(), cu_q,
                                                    cu_k, max_q, max_k, 0.0, causal, rng, unused, scale=softmax_scale)
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)
    Sq, Sk = q.shape[1], k.shape[1]
    if kernel == "cudnn":
        q_, k_, v_, o_, do_ = (canonical_strides(t).transpose(1, 2) for t in (q, k, v, out, dout))
        unit_dim, seed_layout = _cudnn_layout()
        lse_ = (lse.unsqueeze(-1) if unit_dim else lse).contiguous()
        seed, offset = (torch.zeros(shape, dtype=dtype, device=q.device) for shape, dtype in seed_layout)
        grads = aten._scaled_dot_product_cudnn_attention_backward(do_, q_, k_, v_, o_, lse_, seed, offset, None,
                                                                  None, None, Sq, Sk, 0.0, causal, scale=softmax_scale)
        return tuple(g.transpose(1, 2) for g in grads)
    return aten._flash_attention_backward(dout, q, k, v, out, lse.contiguous(), None, None, Sq, Sk, 0.0, causal,
                                          rng, unused, scale=softmax_scale)


def canonical_strides(t):
    """A contiguous `t` with the strides `torch.empty(t.shape)` would have (the same memory).

    A size-1 dimension may carry any stride in a contiguous tensor: rows [a, a + n) of a
    `[1, S, H, D]` row keep the row's batch stride S*H*D, a copy of them has n*H*D. cuDNN keys its
    execution plans on the strides, so the two would build (~80 ms each) and cache two plans for
    one shape: split attention's long documents, views of the row or padded copies at the row's
    end, kept building plans for lengths it had already seen (H100, 2026-11-26)."""
    if not t.is_contiguous():
        return t
    strides, step = [], 1
    for n in reversed(t.shape):
        strides.append(step)
        step *= max(n, 1)
    strides = tuple(reversed(strides))
    return t if t.stride() == strides else t.as_strided(t.shape, strides, t.storage_offset())


def _varlen_args(q, cu_seqlens_q, cu_seqlens_k):
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    max_q, max_k = (_max_seqlen(given, c) for given, c in ((cu_seqlens_q, cu_q), (cu_seqlens_k, cu_k)))
    return cu_q, cu_k, max_q, max_k


def _max_seqlen(given, cu):
    # A caller that knows the bounds on the host (ring attention's plan) attaches the longest
    # document as `seqpar_max_seqlen`: reading it from the device synchronises the host per call.
    known = getattr(given, "seqpar_max_seqlen", None)
    return int((cu[1:] - cu[:-1]).max()) if known is None else known


def _no_dropout_state(device):
    # With dropout 0 the kernels never read the philox state, but its placeholders' shape and dtype
    # changed across torch versions: copy what this torch's forward returns (its meta kernel).
    return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in _flash_rng_layout())


@lru_cache(maxsize=None)
def _flash_rng_layout():
    q = torch.empty(1, 8, 1, 64, device="meta", dtype=torch.bfloat16)
    _, _, rng, unused, _ = aten._flash_attention_forward(q, q, q, None, None, 8, 8, 0.0, True, False)
    return (tuple(rng.shape), rng.dtype), (tuple(unused.shape), unused.dtype)


@lru_cache(maxsize=None)
def _cudnn_layout():
    """(whether lse has a trailing unit dim, the philox placeholders' layouts) of this torch's cuDNN op."""
    q = torch.empty(1, 1, 8, 64, device="meta", dtype=torch.bfloat16)
    _, lse, *_, seed, offset, _ = aten._scaled_dot_product_cudnn_attention(q, q, q, None, True, 0.0, True, False)
    return lse.dim() == 4, tuple((tuple(t.shape), t.dtype) for t in (seed, offset))
