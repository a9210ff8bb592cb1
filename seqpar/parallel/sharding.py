"""The one place where a sequence is cut over the cp group and put back together.

Layouts (every sequence-parallel method takes its layout from here):
- ``contiguous``: rank r holds chunk r of N equal chunks.
- ``zigzag``: the row is cut into 2N chunks and rank r holds chunks r and 2N-1-r, so that
  under a causal mask every rank does the same attention work.
- ``doc_zigzag`` (packed B=1 rows; Megatron-core's THD context parallel, Llama 3): EVERY document
  is cut into 2N pieces and rank r holds pieces r and 2N-1-r of each, so the causal work is equal
  per rank whatever the document mix (the row-level zigzag is not: a rank holding the tail of a
  long document does more). See `DocZigzag` for the padding and the storage order.
- ``doc_balanced`` (packed B=1 rows): documents stay WHOLE on one rank, placed so that the ranks'
  causal work is equal; only the documents that cannot be placed so are cut as doc_zigzag cuts
  them, and only their rows travel round the ring (none at all when nothing is cut). Why:
  doc_zigzag's work is equal (imbalance 1.001) but its compute alone took 27.6 ms where 20.2 is
  ideal (64k packed tokens, 24 documents, 2x H200, 2026-11-26): its short pieces make the varlen
  kernel's tiles ragged; efficiency 0.70 there and 0.73 at 128k against the 0.90 goal, and the row
  zigzag's 0.71 / 0.77 suffers the work imbalance (1.44 / 1.28) instead. See
  `seqpar.parallel.doc_balance` for the planner and the storage order.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

LAYOUTS = ("contiguous", "zigzag", "doc_zigzag", "doc_balanced")
DOC_LAYOUTS = ("doc_zigzag", "doc_balanced")  # cut by documents: need cu_seqlens, any row length


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None:
        if not dist.is_initialized():
            return 1, 0
        group = dist.group.WORLD
    return dist.get_world_size(group), dist.get_rank(group)


_HOST_BOUNDS = WeakIdKeyDictionary()  # cu_seqlens tensor -> (its version, its values), while it lives


def host_bounds(cu_seqlens) -> tuple[int, ...]:
    """`cu_seqlens` as host integers, read from the device once per tensor (and version): every
    layer of a step passes the step's same tensor, and each read is a host-device synchronisation."""
    if not torch.is_tensor(cu_seqlens):
        return tuple(int(x) for x in cu_seqlens)
    if cu_seqlens.is_inference():  # (inference tensors have no version)
        return tuple(int(x) for x in cu_seqlens.tolist())
    hit = _HOST_BOUNDS.get(cu_seqlens)
    if hit is None or hit[0] != cu_seqlens._version:
        hit = _HOST_BOUNDS[cu_seqlens] = (cu_seqlens._version, tuple(int(x) for x in cu_seqlens.tolist()))
    return hit[1]


def chunk_order(world_size: int, layout: str) -> list[list[int]]:
    """For each rank, the indices of the chunks it holds, in the order it stores them."""
    if layout == "contiguous":
        return [[r] for r in range(world_size)]
    if layout == "zigzag":
        return [[r, 2 * world_size - 1 - r] for r in range(world_size)]
    if layout in DOC_LAYOUTS:
        raise ValueError(f"layout {layout} cuts the row by documents, not into chunks (its ranges come from "
                         "document_plan(layout, cu_seqlens, world_size)): only ring attention runs on it; use "
                         "parallel.softmax_sp=ring, or layout zigzag for Ulysses, usp and LASP")
    raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")


def num_chunks(world_size: int, layout: str) -> int:
    """Equal chunks the row must split into (the document layouts pad instead: any length works)."""
    if layout in DOC_LAYOUTS:
        return 1
    return sum(len(c) for c in chunk_order(world_size, layout))


def local_ranges(seq_len: int, world_size: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """Global [start, end) token ranges held by `rank`, in local storage order."""
    n = num_chunks(world_size, layout)
    if seq_len % n:
        raise ValueError(f"sequence length {seq_len} is not divisible into {n} chunks (layout={layout}, cp={world_size})")
    size = seq_len // n
    return [(c * size, (c + 1) * size) for c in chunk_order(world_size, layout)[rank]]


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                   layout: str = "zigzag", cu_seqlens: torch.Tensor | None = None,
                   pad_value: float | int = 0) -> torch.Tensor:
    """This rank's shard of the full sequence `x` (no communication: every rank holds `x`).

    `cu_seqlens` (the GLOBAL document boundaries of x's packed row) is needed by the document
    layouts only; contiguous and zigzag cut the row regardless of documents. doc_zigzag pads each
    document to a multiple of 2N, doc_balanced the cut ones so and each rank's whole documents to
    the same row count, with `pad_value` (use the loss's ignore_index for targets); pad rows are
    dropped again by unshard_sequence, and ring attention keeps them apart from real tokens.
    """
    world, rank = group_size_rank(group)
    if layout in DOC_LAYOUTS:
        return _shard_documents(x, rank, world, dim, layout, cu_seqlens, pad_value)
    return shard_for_rank(x, rank, world, dim=dim, layout=layout)


def unshard_sequence(x: torch.Tensor, group: dist.ProcessGroup | None = None, *, dim: int = 1,
                     layout: str = "zigzag", cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The full sequence from every rank's shard; differentiable (the gradient of the full
    sequence is summed over ranks and each rank keeps its own shard's part). The document layouts
    need the `cu_seqlens` the row was sharded with, and drop the pad rows."""
    world, _ = group_size_rank(group)
    if world == 1:
        return x
    if layout in DOC_LAYOUTS:
        return _GatherDocuments.apply(x, group, dim, document_plan(layout, cu_seqlens, world))
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


# ---------------------------------------------------------------- per-document zigzag (doc_zigzag)

@dataclass(frozen=True, eq=False)  # identity hash: plans are cached and looked up by their bounds
class DocZigzag:
    """Where every token of a packed row lives under doc_zigzag over N ranks.

    Padding: document d of length L is padded at its end to P = 2N * ceil(L / 2N) tokens, cut into
    2N pieces of p = P / 2N. The pad tail is its own document in `bounds` (the padded row's
    boundaries), so no real token attends a pad token or is attended by one: the real tokens'
    outputs and gradients are exactly those of the unpadded row. Every rank holds 2 * sum(p)
    rows (`local_len`), the same on each rank: the ring's messages have one size.

    Storage order on rank r: piece r of every document, then piece 2N-1-r of every document
    (`halves[r]`, global ranges of the padded row). Within a half every document's piece has the
    same index, so its position relative to another rank's half is the same for all documents
    (before, equal, after): one ring step is a constant number of varlen kernel calls, whatever
    the number of documents.

    At N = 1 the layout is the identity (no padding, no reordering), so a cp=1 run is unchanged."""
    world: int
    bounds: tuple[int, ...]  # padded row: real documents and their pad tails
    halves: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]  # [rank][half][doc] -> (start, end)
    local_len: int
    source: torch.Tensor  # [world, local_len] int64: index of each local row in the unpadded row, -1 for pad
    gathered: torch.Tensor  # [tokens] int64: each token's row in the ranks' shards laid end to end


def doc_zigzag_plan(cu_seqlens, world_size: int) -> DocZigzag:
    """The doc_zigzag layout of a packed row with document boundaries `cu_seqlens` (list or tensor)."""
    return _plan(_bounds(cu_seqlens), world_size)


@lru_cache(maxsize=8)  # one plan per micro-batch, asked for by the sharding and by every layer
def _plan(bounds: tuple[int, ...], world: int) -> DocZigzag:
    total = bounds[-1]
    if world == 1:
        every = torch.arange(total)
        return DocZigzag(1, bounds, (((0, total),),), total, every[None], every)
    n = 2 * world
    starts, lengths = torch.tensor(bounds[:-1]), torch.diff(torch.tensor(bounds))
    pieces = (lengths + n - 1) // n
    padded_starts = torch.cumsum(pieces * n, 0) - pieces * n
    padded = [0]
    for a, length, p in zip(padded_starts.tolist(), lengths.tolist(), pieces.tolist()):
        padded += [a + length] + ([a + n * p] if n * p > length else [])
    # every half lists the documents in order, p_d rows each: row -> (document, row within its piece)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), pieces)
    within = torch.arange(len(doc)) - torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)
    halves, source = [], []
    for r in range(world):
        rows, ranges = [], []
        for piece in (r, n - 1 - r):
            offset = piece * pieces[doc] + within  # position inside the padded document
            rows.append(torch.where(offset < lengths[doc], starts[doc] + offset, -1))
            lo = padded_starts + piece * pieces
            ranges.append(tuple(zip(lo.tolist(), (lo + pieces).tolist())))
        halves.append(tuple(ranges))
        source.append(torch.cat(rows))
    source = torch.stack(source)
    local_len = source.shape[1]
    gathered = torch.empty(total, dtype=torch.long)
    real = source.reshape(-1) >= 0
    gathered[source.reshape(-1)[real]] = torch.arange(world * local_len)[real]
    return DocZigzag(world, tuple(padded), tuple(halves), local_len, source, gathered)


def document_plan(layout: str, cu_seqlens, world_size: int):
    """The plan (`DocZigzag` or `doc_balance.DocBalanced`) of a document layout: where every token
    of the packed row lives; both have `world`, `local_len`, `source` and `gathered`."""
    if layout == "doc_zigzag":
        return doc_zigzag_plan(cu_seqlens, world_size)
    if layout == "doc_balanced":
        from seqpar.parallel.doc_balance import doc_balanced_plan  # (it builds on this module's doc_zigzag)
        return doc_balanced_plan(cu_seqlens, world_size)
    raise ValueError(f"layout {layout!r} is not a document layout {DOC_LAYOUTS}")


def _bounds(cu_seqlens) -> tuple[int, ...]:
    if cu_seqlens is None:
        raise ValueError("the document layouts (doc_zigzag, doc_balanced) cut the row by its documents: pass "
                         "cu_seqlens (the global document boundaries of the packed row)")
    bounds = host_bounds(cu_seqlens)
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] < 1 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the row's length, got {list(bounds)}")
    return tuple(sorted(set(bounds)))  # an empty document holds no token: nothing to place


def _shard_documents(x, rank, world, dim, layout, cu_seqlens, pad_value):
    plan = document_plan(layout, cu_seqlens, world)
    total = _bounds(cu_seqlens)[-1]
    if x.shape[dim] != total:
        raise ValueError(f"{layout}: x has {x.shape[dim]} rows along dim {dim} but cu_seqlens end at {total}; "
                         "pass the whole packed row and its global document boundaries")
    if world == 1:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = 1
    padded = torch.cat([x, x.new_full(pad_shape, pad_value)], dim=dim)  # row x.shape[dim] is the pad
    idx = plan.source[rank].to(x.device)
    return padded.index_select(dim, torch.where(idx < 0, x.shape[dim], idx))


class _GatherDocuments(torch.autograd.Function):
    """unshard_sequence for the document layouts: all-gather the ranks' shards, keep the real rows in row order."""

    @staticmethod
    def forward(ctx, x, group, dim, plan):
        where = plan.gathered.to(x.device)
        ctx.group, ctx.dim, ctx.where, ctx.world, ctx.local_len = group, dim, where, plan.world, plan.local_len
        return torch.cat(_all_gather(x, group), dim=dim).index_select(dim, where)

    @staticmethod
    def backward(ctx, grad):
        shape = list(grad.shape)
        shape[ctx.dim] = ctx.local_len * ctx.world
        full = grad.new_zeros(shape).index_copy_(ctx.dim, ctx.where, grad.contiguous())  # pad rows: zero
        return _reduce_scatter(list(full.chunk(ctx.world, dim=ctx.dim)), ctx.group), None, None, None


def check_layout(parallel_cfg, layer_types: str) -> None:
    """ValueError naming the fix when `parallel.layout` cannot run with these settings (config validation)."""
    p = parallel_cfg
    if p.layout not in DOC_LAYOUTS or p.cp == 1:  # at cp=1 the document layouts are the identity
        return
    name = f"parallel.layout={p.layout}"
    if "S" in layer_types and p.softmax_sp != "ring":
        raise ValueError(f"{name} runs softmax attention with parallel.softmax_sp=ring only "
                         f"(got {p.softmax_sp!r}); set parallel.softmax_sp=ring or parallel.layout=zigzag")
    if "L" in layer_types:
        raise ValueError(f"{name} with linear-attention layers (model.layer_pattern="
                         f"{layer_types!r}): LASP's state scan needs the row's chunk order; use parallel.layout=zigzag "
                         "or contiguous, or a softmax-only model")
    if p.pp > 1:
        raise ValueError(f"{name} with parallel.pp>1: the padded local length changes with each "
                         "micro-batch's documents and the pipeline sends fixed shapes; use parallel.layout=zigzag")
    if p.tp > 1 and p.tp_sequence_parallel:
        raise ValueError(f"{name} with parallel.tp>1 and tp_sequence_parallel=true: the padded "
                         "local length need not divide by tp; set parallel.tp_sequence_parallel=false or "
                         "parallel.layout=zigzag")
