"""flash_attn through attention kernels that torch ships (cuDNN / flash-attn inside torch).

Only for the cases `kernels.dispatch` routes here: no lse, and either equal-length dense rows
(SDPA) or packed documents (varlen_attn), with shared or separate q/k boundaries.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# cuDNN is the fastest on H100/H200; flash next; the others keep odd head dims and fp32 working.
_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
               SDPBackend.MATH]


def sdpa_attention(q, k, v, *, causal=True, softmax_scale=None):
    Hq, Hkv = q.shape[2], k.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))
    kwargs = {"set_priority": True} if "set_priority" in inspect.signature(sdpa_kernel).parameters else {}
    with sdpa_kernel(_SDPA_ORDER, **kwargs):
        o = F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal, scale=softmax_scale,
                                           enable_gqa=Hq != Hkv)
    return o.transpose(1, 2)


@lru_cache(maxsize=None)
def _varlen():
    from torch.nn.attention.varlen import varlen_attn
    params = inspect.signature(varlen_attn).parameters
    # torch 2.10 took `is_causal`, later versions window_size=(-1, 0); enable_gqa came after 2.11.
    return varlen_attn, "is_causal" in params, "enable_gqa" in params


def varlen_attention(q, k, v, *, cu_seqlens_q, cu_seqlens_k, causal=True, softmax_scale=None):
    varlen_attn, takes_is_causal, takes_gqa = _varlen()
    cu_q = cu_seqlens_q.to(device=q.device, dtype=torch.int32)
    cu_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
    max_q, max_k = (int((c[1:] - c[:-1]).max()) for c in (cu_q, cu_k))  # one host sync per call
    causal_kw = {"is_causal": causal} if takes_is_causal else {"window_size": (-1, 0) if causal else (-1, -1)}
    group = q.shape[2] // k.shape[2]
    gqa_kw = {}
    if group > 1 and takes_gqa:
        gqa_kw = {"enable_gqa": True}
    elif group > 1:  # older torch: materialise the shared kv heads (query head h reads kv head h // group)
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    o = varlen_attn(q[0], k[0], v[0], cu_q, cu_k, max_q, max_k, scale=softmax_scale, **causal_kw, **gqa_kw)
    return o.unsqueeze(0)
