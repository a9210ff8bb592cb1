"""The one place where a sequence is cut over the cp group and put back together.

Layouts (every sequence-parallel method takes its layout from here):
- ``contiguous``: rank r holds chunk r of N equal chunks.
- ``zigzag``: the row is cut into 2N chunks and rank r holds chunks r and 2N-1-r, so that
  under a causal mask every rank does the same attention work.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag")


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        if not dist.is_initialized():
            return 1, 0
        group = dist.group.WORLD
    return dist.get_world_size(group), dist.get_rank(group)


def chunk_order(world_size: int, layout: str) -> list[list[int]]:
    """For each rank, the indices of the chunks it holds, in the order it stores them."""
    if layout == "contiguous":
        return [[r] for r in range(world_size)]
    if layout == "zigzag":
        return [[r, 2 * world_size - 1 - r] for r in range(world_size)]
    raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")


def num_chunks(world_size: int, layout: str) -> int:
    return sum(len(c) for c in chunk_order(world_size, layout))


def local_ranges(seq_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global [start, end) token ranges held by `rank`, in local storage order."""
    n = num_chunks(world_size, layout)
    if seq_len % n:
        raise ValueError(f"sequence length {seq_len} is not divisible into {n} chunks (layout={layout}, cp={world_size})")
    size = seq_len // n
    return [(c * size, (c + 1) * size) for c in chunk_order(world_size, layout)[rank]]


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                   layout: str = "zigzag", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's shard of the full sequence `x` (no communication: every rank holds `x`).

    `cu_seqlens` is accepted so that document-aware layouts share this signature; the layouts
    here cut the packed row regardless of document boundaries.
    """
    world, rank = group_size_rank(group)
    return shard_for_rank(x, rank, world, dim=dim, layout=layout)


def unshard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                     layout: str = "zigzag", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The full sequence from every rank's shard; differentiable (the gradient of the full
    sequence is summed over ranks and each rank keeps its own shard's part)."""
    world, _ = group_size_rank(group)
    if world == 1:
        return x
    return _GatherSequence.apply(x, group, dim, layout)


def _all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    world, _ = group_size_rank(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _reduce_scatter(parts: list[torch.Tensor], group) -> torch.Tensor:
    """Sum of every rank's `parts[my_rank]`; gloo has no reduce_scatter, so it all-reduces."""
    _, rank = group_size_rank(group)
    if dist.get_backend(group) == "nccl":
        out = torch.empty_like(parts[rank])
        dist.reduce_scatter(out, [p.contiguous() for p in parts], group=group)
        return out
    flat = torch.stack([p.contiguous() for p in parts])
    dist.all_reduce(flat, group=group)
    return flat[rank]


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, layout):
        ctx.group, ctx.dim, ctx.layout = group, dim, layout
        parts = _all_gather(x, group)
        return _reassemble(parts, dim, layout)

    @staticmethod
    def backward(ctx, grad):
        world, _ = group_size_rank(ctx.group)
        parts = [shard_for_rank(grad, r, world, dim=ctx.dim, layout=ctx.layout) for r in range(world)]
        return _reduce_scatter(parts, ctx.group), None, None, None


def shard_for_rank(x: torch.Tensor, rank: int, world_size: int, *, dim: int, layout: str) -> torch.Tensor:
    ranges = local_ranges(x.shape[dim], world_size, rank, layout)
    return torch.cat([x.narrow(dim, a, b - a) for a, b in ranges], dim=dim)


def _reassemble(parts: list[torch.Tensor], dim: int, layout: str) -> torch.Tensor:
    world = len(parts)
    order = chunk_order(world, layout)
    per_rank = len(order[0])
    chunks: dict[int, torch.Tensor] = {}
    for r, part in enumerate(parts):
        for idx, piece in zip(order[r], part.chunk(per_rank, dim=dim)):
            chunks[idx] = piece
    return torch.cat([chunks[i] for i in range(len(chunks))], dim=dim)


def all_gather_autograd(x: torch.Tensor, group) -> torch.Tensor:
    """Stack of every rank's `x` along a new leading dim, differentiable (used to exchange
    small per-rank tensors such as linear-attention memory states)."""
    world, _ = group_size_rank(group)
    if world == 1:
        return x.unsqueeze(0)
    return _AllGatherStack.apply(x, group)


class _AllGatherStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return torch.stack(_all_gather(x, group))

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(list(grad.unbind(0)), ctx.group), None


def depend_on(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """`x` unchanged, but autograd-dependent on `others` (their gradient from here is zero).

    A collective's backward must run on every rank. When a rank's output happens not to use the
    result of a differentiable collective (LASP-2's first rank with the contiguous layout), tie
    it in, or that rank skips the mirrored reduce-scatter and its peers wait forever."""
    return _DependOn.apply(x, *others)


class _DependOn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, *others):
        ctx.others = [(o.shape, o.dtype, o.device) for o in others]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.others))


def document_positions(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Position of each token of a packed row inside its own document (RoPE restarts per document)."""
    idx = torch.arange(seq_len, device=cu_seqlens.device)
    starts = cu_seqlens[:-1].long()
    doc = torch.searchsorted(starts, idx, right=True) - 1
    return idx - starts[doc]
