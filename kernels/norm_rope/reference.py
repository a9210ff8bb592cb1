"""RMSNorm and rotary embeddings (rotate-half convention) in plain torch.

Math in fp32 (fp64 for fp64 inputs), results in the input's dtype.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def rms_norm_reference(x, weight, eps=1e-6):
    dt = compute_dtype(x.dtype)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(dt)).to(x.dtype)


def apply_rotary_reference(x, cos, sin):
    """x `[B, S, H, D]`; cos, sin `[S, D/2]` or `[B, S, D/2]`."""
    dt = compute_dtype(x.dtype)
    half = x.shape[-1] // 2
    if cos.shape[-1] != half or 2 * half != x.shape[-1]:
        raise ValueError(f"cos/sin last dim {cos.shape[-1]} must be half of head dim {x.shape[-1]}")
    cos = cos.to(dt).unsqueeze(-2)  # broadcast over heads
    sin = sin.to(dt).unsqueeze(-2)
    x1, x2 = x.to(dt).split(half, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rotary_cos_sin(position_ids, head_dim, theta=10000.0, dtype=torch.float32):
    """cos, sin of shape `position_ids.shape + (head_dim // 2,)` for any integer positions.

    Angles are formed in fp64: at positions near 1e6 an fp32 product is off by ~0.05 rad.
    """
    if head_dim % 2:
        raise ValueError(f"rotary head_dim must be even, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=position_ids.device) / head_dim
    inv_freq = theta ** -exponent
    angles = position_ids.to(torch.float64)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)
