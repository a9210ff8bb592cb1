"""Merging one block's attention result into a running one: ring attention's fold of a ring
step's (out, lse) into a row's earlier result. The public function picks its implementation
through `kernels.dispatch`."""
from __future__ import annotations

from seqpar.kernels.attn_merge.reference import attn_merge_reference_
from seqpar.kernels.dispatch import backend


def attn_merge_(old, o, lse, l, out):
    """out <- old e^(lse - new) + o e^(l - new), lse <- new = logaddexp(lse, l), in place.

    old, o, out `[B, n, H, D]` (out may be old; old, o, out of any float dtype, last dim
    contiguous on CUDA), lse `[B, H, n]` fp32 (or fp64), l `[B, H, n]`: the running result and
    its log-sum-exp, and the block's. A row with lse = l = -inf (no key seen) gets 0. The merge is
    computed in lse's dtype and rounded into out once. Returns (out, lse).

    On CUDA one Triton pass reads old, o and both lse and writes out and lse; torch's ops take
    about eight (logaddexp, the weights, a product written to an fp32 buffer, the sum)."""
    B, n, H, _ = out.shape
    if old.shape != out.shape or o.shape != out.shape or lse.shape != (B, H, n) or l.shape != (B, H, n):
        raise ValueError(f"attn_merge_: old {tuple(old.shape)}, o {tuple(o.shape)}, out {tuple(out.shape)} must be "
                         f"[B, n, H, D] alike and lse {tuple(lse.shape)}, l {tuple(l.shape)} [B, H, n] = {(B, H, n)}")
    if backend("attn_merge", old, o, lse, l, out) == "triton":
        from seqpar.kernels.attn_merge.triton import attn_merge_triton_
        return attn_merge_triton_(old, o, lse, l, out)
    return attn_merge_reference_(old, o, lse, l, out)
