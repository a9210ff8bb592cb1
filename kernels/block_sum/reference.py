"""block_sum_ in plain torch: the ground truth of the Triton kernel, and what runs off CUDA."""
from __future__ import annotations

import torch


def block_sum_reference_(out, parts):
    """`block_sum_` (kernels/block_sum/__init__.py) as torch ops: the sum in order, in the wide
    dtype, with no cast copy of any part (a running sum in the wide dtype only for three or more)."""
    wide = torch.promote_types(torch.float32, out.dtype)
    for p in parts:
        wide = torch.promote_types(wide, p.dtype)
    if len(parts) == 2:
        return _add(parts[0], parts[1], out, wide)
    aliased = any(p is out for p in parts[1:])
    total = out if out.dtype == wide and not aliased else torch.empty(out.shape, dtype=wide, device=out.device)
    _add(parts[0], parts[1], total, wide)
    for p in parts[2:-1]:
        total.add_(p)
    if total is out:
        return out.add_(parts[-1])
    return torch.add(total, parts[-1], out=out)


def _add(a, b, out, wide):
    """out = a + b in `wide`, rounded once into out."""
    if torch.promote_types(a.dtype, b.dtype) in (wide, out.dtype):
        # torch adds 16-bit tensors in fp32 and rounds once (a vectorised pass)
        return torch.add(a, b, out=out)
    # two 16-bit blocks into a wider out: an add would round to 16 bits first; c1 + c2 * 1 with a
    # dimensioned one of the wide dtype takes the sum in it (a slower, unvectorised pass)
    return torch.addcmul(a, b, _one(wide, out.device), out=out)


_ONES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _one(dtype, device):
    key = (dtype, device)
    if key not in _ONES:
        _ONES[key] = torch.ones(1, dtype=dtype, device=device)
    return _ONES[key]
