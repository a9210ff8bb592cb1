"""Chunked fused linear + cross-entropy: `fused_linear_cross_entropy` dispatches through `kernels.dispatch`."""
from __future__ import annotations

from seqpar.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from seqpar.kernels.dispatch import backend


def fused_linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, chunk_size=4096):
    """SUM of cross-entropies of `hidden @ weight.T` (hidden `[..., d]`, weight `[V, d]`) against
    `targets` `[...]`, skipping `ignore_index`; fp32 (fp64 for fp64 inputs). The `[N, V]` logits
    never exist: rows go `chunk_size` at a time and the grads are formed in the forward.

    `chunk_size` is in rows: each chunk re-reads and re-writes the fp32 grad_weight accumulator
    (V x d x 8 bytes) against 6 x rows x V x d matmul FLOPs, so fewer, longer chunks are faster;
    the chunk's fp32 logits (rows x V x 4 bytes) are its memory."""
    if backend("fused_linear_cross_entropy", hidden, weight) == "triton":
        from seqpar.kernels.cross_entropy.triton import fused_linear_cross_entropy_triton
        return fused_linear_cross_entropy_triton(hidden, weight, targets, ignore_index=ignore_index,
                                                 chunk_size=chunk_size)
    return fused_linear_cross_entropy_reference(hidden, weight, targets, ignore_index=ignore_index,
                                                chunk_size=chunk_size)
