"""RMSNorm and rotary embeddings: public functions pick their implementation through `kernels.dispatch`."""
from __future__ import annotations

import torch

from seqpar.kernels.dispatch import backend
from seqpar.kernels.norm_rope import reference


def rms_norm(x, weight, eps=1e-6):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32, returned in x's dtype."""
    impl = backend("rms_norm", x, weight)
    if impl == "triton":
        from seqpar.kernels.norm_rope.triton import rms_norm_triton
        return rms_norm_triton(x, weight, eps)
    if impl == "torch":
        # the fused CUDA kernel accumulates in fp32 itself; it wants weight in x's dtype
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    return reference.rms_norm_reference(x, weight, eps)


def apply_rotary(x, cos, sin):
    """Rotate-half RoPE on x `[B, S, H, D]` with cos, sin `[S, D/2]` or `[B, S, D/2]`."""
    if backend("apply_rotary", x, cos, sin) == "triton":
        from seqpar.kernels.norm_rope.triton import apply_rotary_triton
        return apply_rotary_triton(x, cos, sin)
    return reference.apply_rotary_reference(x, cos, sin)


def rotary_cos_sin(position_ids, head_dim, theta=10000.0, dtype=torch.float32):
    """(cos, sin), each `position_ids.shape + (head_dim // 2,)`: angle = position * theta^(-2i/head_dim)."""
    backend("rotary_cos_sin", position_ids)
    return reference.rotary_cos_sin(position_ids, head_dim, theta, dtype)
