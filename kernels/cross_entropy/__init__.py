"""Chunked fused linear + cross-entropy: `fused_linear_cross_entropy` dispatches through `kernels.dispatch`."""
from __future__ import annotations

from seqpar.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from seqpar.kernels.dispatch import backend


def fused_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, chunk_size=4096):
    """SUM of cross-entropies of `hidden @ weight.T` (hidden `[..., d]`, weight `[V, d]`) against
    `targets` `[...]`, skipping `ignore_index`; fp32 (fp64 for fp64 inputs). The `[N, V]` logits
    never exist: rows go `chunk_size` at a time and the grads are formed in the forward."""
    backend("fused_linear_cross_entropy", hidden, weight)
    return fused_linear_cross_entropy_reference(hidden, weight, targets, ignore_index=ignore_index,
                                                chunk_size=chunk_size)
