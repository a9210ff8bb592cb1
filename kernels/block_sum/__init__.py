"""Summing a few blocks' gradients into one buffer: ring attention's fold of a row's dQ (or a key
row's dK/dV) from the blocks that reached it, and the all-gather's sum of the ranks' dK/dV. The
public function picks its implementation through `kernels.dispatch`."""
from __future__ import annotations

from seqpar.kernels.block_sum.reference import block_sum_reference_
from seqpar.kernels.dispatch import backend


def block_sum_(out, parts):
    """out <- parts[0] + parts[1] + ..., taken in order in fp32 (or the widest dtype among out and
    parts, when wider) and rounded into out once. Returns out.

    parts: a list of tensors of out's shape, of any float dtypes; one of them may be out itself
    (a running sum folding the next block in). On CUDA, for 4-D `[B, n, H, D]` views with a
    contiguous last dim, one Triton pass reads each part once and writes out once for two or
    three parts: torch's ops take two passes through an fp32 buffer for three bf16 blocks, and
    add a bf16 block to fp32 rows (or bf16 to bf16 into fp32) in an unvectorised loop at about
    a third of the memory bandwidth."""
    if not parts:
        raise ValueError("block_sum_: no parts to sum")
    if any(p.shape != out.shape for p in parts):
        raise ValueError(f"block_sum_: parts {[tuple(p.shape) for p in parts]} must all have out's shape {tuple(out.shape)}")
    if len(parts) == 1:
        return out if parts[0] is out else out.copy_(parts[0])
    if backend("block_sum", out, *parts) == "triton":
        from seqpar.kernels.block_sum.triton import block_sum_triton_
        return block_sum_triton_(out, parts)
    return block_sum_reference_(out, parts)
