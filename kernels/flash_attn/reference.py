"""Softmax attention in plain torch, one document at a time.

Memory is quadratic in the longest document only, never in the packed row. Scores, the softmax
and the lse are computed in fp32 (fp64 for fp64 inputs); the output is cast back to q's dtype.

Causal masks are aligned bottom-right: in a document with Lq queries and Lk keys, query j sees
keys ``< Lk - Lq + j + 1``. So with Lq > Lk the first ``Lq - Lk`` queries see no key at all; those
rows return out = 0 and lse = -inf (the neutral element when partial results are merged).
"""
from __future__ import annotations

import torch


def document_bounds(q, k, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """(q_bounds, k_bounds) as python lists, validated against the tensors."""
    if cu_seqlens is not None and (cu_seqlens_q is not None or cu_seqlens_k is not None):
        raise ValueError("pass either cu_seqlens or cu_seqlens_q/cu_seqlens_k, not both")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    Sq, Sk = q.shape[1], k.shape[1]
    if cu_seqlens is None and cu_seqlens_q is None:
        return [0, Sq], [0, Sk]
    if q.shape[0] != 1:
        raise ValueError(f"packed documents need batch size 1, got q of shape {tuple(q.shape)}")
    if cu_seqlens is not None:
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    bq, bk = _as_list(cu_seqlens_q), _as_list(cu_seqlens_k)
    if len(bq) != len(bk):
        raise ValueError(f"cu_seqlens_q has {len(bq) - 1} documents, cu_seqlens_k {len(bk) - 1}")
    for name, b, total in (("q", bq, Sq), ("k", bk, Sk)):
        if b[0] != 0 or b[-1] != total or any(x > y for x, y in zip(b, b[1:])):
            raise ValueError(f"cu_seqlens for {name} must rise from 0 to {total}, got {b}")
    return bq, bk


def _as_list(cu):
    return cu.tolist() if torch.is_tensor(cu) else list(cu)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def flash_attn_reference(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                         softmax_scale=None, return_lse=False):
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv or v.shape[2] != Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}, {v.shape[2]})")
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    bq, bk = document_bounds(q, k, cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    outs, lses = [], []
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if q1 == q0:
            continue
        o, lse = _attend_document(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], causal, scale, Hq // Hkv)
        outs.append(o)
        lses.append(lse)
    out = torch.cat(outs, dim=1).to(q.dtype)
    return (out, torch.cat(lses, dim=2)) if return_lse else out


def _attend_document(q, k, v, causal, scale, group):
    dt = compute_dtype(q.dtype)
    B, Lq, Hq, _ = q.shape
    Lk = k.shape[1]
    if Lk == 0:
        return (q.new_zeros(B, Lq, Hq, v.shape[-1], dtype=dt),
                torch.full((B, Hq, Lq), float("-inf"), dtype=dt, device=q.device))
    # GQA: query head h reads kv head h // group, which is what repeat_interleave lays out.
    k = k.to(dt).repeat_interleave(group, dim=2)
    v = v.to(dt).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.to(dt), k) * scale
    if causal:
        j = torch.arange(Lq, device=q.device)[:, None]
        kk = torch.arange(Lk, device=q.device)[None, :]
        # masked_fill's backward writes 0 into masked positions, which also clears the NaNs that
        # fully masked rows produce below (inf * 0), so gradients stay finite.
        s = s.masked_fill(kk > Lk - Lq + j, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = (m + torch.log(torch.exp(s - m).sum(dim=-1, keepdim=True)))  # -inf where no key is visible
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(s - lse_safe)
    o = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return o, lse.squeeze(-1)


def flash_attn_backward_reference(dout, q, k, v, out, lse, *, causal=True, cu_seqlens=None, cu_seqlens_q=None,
                                  cu_seqlens_k=None, softmax_scale=None):
    """(dq, dk, dv) of `out = flash_attn(q, k, v, ...)` from the upstream gradient `dout`.

    `out` and `lse` may be those of a larger attention that this call is one block of (ring
    attention passes the merged output and log-sum-exp): with P = exp(S - lse) and
    D = rowsum(dout * out), dS = P * (dout v^T - D) is this block's exact share of the gradient
    (FlashAttention-2, Algorithm 2). Computed in fp32 (fp64 for fp64), returned in the inputs' dtypes.
    """
    B, Sq, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    bq, bk = document_bounds(q, k, cu_seqlens, cu_seqlens_q, cu_seqlens_k)
    dt = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    for q0, q1, k0, k1 in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if q1 == q0 or k1 == k0:
            continue
        grads = _document_backward(dout[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1],
                                   lse[:, :, q0:q1], causal, scale, Hq // Hkv, dt)
        dq[:, q0:q1], dk[:, k0:k1], dv[:, k0:k1] = grads
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _document_backward(do, q, k, v, o, lse, causal, scale, group, dt):
    B, Lq, Hq, _ = q.shape
    Lk, Hkv = k.shape[1], k.shape[2]
    do, q, o = do.to(dt), q.to(dt), o.to(dt)
    kr = k.to(dt).repeat_interleave(group, dim=2)
    vr = v.to(dt).repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if causal:
        j = torch.arange(Lq, device=q.device)[:, None]
        kk = torch.arange(Lk, device=q.device)[None, :]
        s = s.masked_fill(kk > Lk - Lq + j, float("-inf"))
    lse = lse.to(dt)[..., None]
    # rows that see no key have lse = -inf and every score masked: their P is 0, not exp(nan)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)))
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, vr)
    delta = (do * o).sum(-1).transpose(1, 2)[..., None]  # [B, H, Lq, 1]
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q)
    # GQA: a kv head's gradient is the sum over the query heads that read it
    fold = lambda t: t.reshape(B, Lk, Hkv, group, t.shape[-1]).sum(3)
    return dq, fold(dk), fold(dv)
