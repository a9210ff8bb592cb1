"""Layout doc_balanced: short documents stay whole on one rank; only the documents that cannot be
placed without breaking the balance are cut over every rank, doc_zigzag-style.

Why: doc_zigzag cuts EVERY document into 2N pieces. Its work is equal per rank (imbalance 1.001
on the bench's lognormal mix, 64k tokens, 24 documents, 2x H200, 2026-11-26) and little of its
communication is exposed (1.4 ms), yet its compute alone took 27.6 ms against 20.2 ms ideal
(one GPU's 40.4 ms over 2): ~700-token pieces make the varlen kernel's tiles ragged, and the
calls many. Efficiency: doc_zigzag 0.70 (cuDNN family) / 0.69 (flash), the row zigzag 0.71 /
0.67 (documents whole, but work imbalance 1.44). A document kept whole on one rank costs what it
costs on one GPU; balance comes from WHICH rank holds it.

`place_documents` decides, per packed row, which documents are cut and which rank holds each of
the others; `doc_balanced_plan` turns that into where every token lives (`DocBalanced`), the
same for shard_sequence, unshard_sequence and ring attention. Storage on rank r: the cut
documents' doc_zigzag storage first (pieces r and 2N-1-r of each: the doc_zigzag ring schedule
applies to it unchanged, and only these rows travel round the ring), then the rank's whole
documents in row order, then one pad document that brings every rank to the same row count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from seqpar.parallel.sharding import DocZigzag, _bounds, _plan

# The planner's cost model of a varlen attention kernel: a document of n rows is T = ceil(n / TILE)
# query tiles, each paying a fixed QUERY_TILE_COST (load Q, write O and the LSE) plus one unit per
# key tile it visits. Calibrated on doc_zigzag's compute alone against one GPU's half (bench ring,
# 2x H200, 2026-11-26, the lognormal mix): measured 1.37 at 64k and 1.31 at 128k total tokens,
# modelled 1.38 and 1.32; the query-key pairs (the model without either term) say 1.00. Short
# pieces are what costs doc_zigzag: few key tiles for each query tile's fixed cost.
TILE = 128
QUERY_TILE_COST = 6
# The planner stops cutting once the modelled cost is within this factor of the mean: a further cut
# could gain at most this much.
TOLERANCE = 1.02
# Rows a rank's whole documents may exceed an equal share by before the planner looks elsewhere;
# the shortfall on the other ranks is padding (one pad document per rank).
SLACK_FRACTION = 0.01
# Packings that pad the row by more than this are not taken (the pad rows cost every other layer).
MAX_PAD_FRACTION = 0.03
# At most this many packings are tried (one per further document cut, longest first): the plan is
# made on the host for every micro-batch.
MAX_CANDIDATES = 48


@dataclass(frozen=True)
class Placement:
    """Where each document of a packed row goes over `world` ranks."""
    world: int
    split: tuple[int, ...]  # documents cut over every rank (ascending)
    owner: tuple[int, ...]  # per document: the rank that holds it whole, -1 when it is cut
    local_len: int  # rows per rank, padding included
    work: tuple[int, ...]  # causal query-key pairs per rank (pad document and split share included)
    cost: tuple[float, ...]  # the same in the kernel cost model (units: one tile pair)

    @property
    def imbalance(self) -> float:
        """max / mean of the modelled cost."""
        return max(self.cost) / (sum(self.cost) / self.world)


def _pairs(n: int) -> int:
    return n * (n + 1) // 2


def _tiles(n: int) -> int:
    return -(-n // TILE)


def whole_cost(n: int) -> float:
    """Modelled cost of a causal document of n rows in one varlen call."""
    t = _tiles(n)
    return QUERY_TILE_COST * t + t * (t + 1) / 2


def cut_cost(n: int, world: int) -> float:
    """Modelled cost, on each rank, of a causal document of n rows cut doc_zigzag-style: two
    diagonal pieces and 2N-1 piece-by-piece rectangles over the ring's steps (padded to 2N pieces)."""
    t = _tiles(-(-n // (2 * world)))
    return 2 * (QUERY_TILE_COST * t + t * (t + 1) / 2) + (2 * world - 1) * (QUERY_TILE_COST * t + t * t)


def place_documents(lengths, world: int) -> Placement:
    """Which documents to cut and which rank holds each of the others.

    Candidates: cut the k longest documents (k = 0, 1, ...) and pack the rest longest first, each
    onto the rank of least modelled cost among those with room for it (room: an equal share of the
    uncut tokens plus SLACK_FRACTION), or, where none has room, onto the emptiest rank (more
    padding). The candidate whose slowest rank costs least is taken, among those padding the row by
    at most MAX_PAD_FRACTION (or doc_zigzag's padding, when more); the search stops at the first
    within TOLERANCE of balance. Cutting every document (doc_zigzag) is always a candidate.
    Deterministic: ties go to the lower document and rank."""
    lengths = [int(n) for n in lengths]
    if world < 1 or not lengths or any(n < 1 for n in lengths):
        raise ValueError(f"place_documents needs world >= 1 and documents of >= 1 token, got {world}, {lengths}")
    order = sorted(range(len(lengths)), key=lambda d: (-lengths[d], d))
    slack = math.ceil(SLACK_FRACTION * sum(lengths) / world)
    candidates = [_pack(lengths, order, order, world, slack)]  # every document cut
    # (tiny rows: doc_zigzag's own padding, < 2N a document, may exceed the fraction; no worse is fine)
    max_pad = max(MAX_PAD_FRACTION * sum(lengths), candidates[0].local_len * world - sum(lengths))
    for k in range(min(len(lengths), MAX_CANDIDATES)):
        placed = _pack(lengths, order, order[:k], world, slack)
        if placed.local_len * world - sum(lengths) <= max_pad:
            candidates.append(placed)
            if placed.imbalance <= TOLERANCE:
                break
    return min(candidates, key=lambda p: (max(p.cost), len(p.split)))


def _pack(lengths, order, cut, world, slack) -> Placement:
    """The packing of the documents not in `cut` (see place_documents)."""
    cut = set(cut)
    whole_tokens = sum(lengths) - sum(lengths[d] for d in cut)
    capacity = -(-whole_tokens // world) + slack
    tokens, cost, owner = [0] * world, [0.0] * world, [-1] * len(lengths)
    for d in order:
        if d in cut:
            continue
        n = lengths[d]
        fits = [r for r in range(world) if tokens[r] + n <= capacity]
        r = min(fits, key=lambda r: (cost[r], tokens[r], r)) if fits else min(range(world), key=lambda r: (tokens[r], r))
        owner[d], tokens[r], cost[r] = r, tokens[r] + n, cost[r] + whole_cost(n)
    rows, pieces = max(tokens), [-(-lengths[d] // (2 * world)) for d in cut]
    mine = [[lengths[d] for d in range(len(lengths)) if owner[d] == r] for r in range(world)]
    # the pad document attends itself; a cut document's share is the same on every rank
    pad = [whole_cost(rows - t) if rows > t else 0.0 for t in tokens]
    cut_share = sum(cut_cost(lengths[d], world) for d in cut)
    pair_share = -(-sum(_pairs(2 * world * p) for p in pieces) // world)
    work = tuple(sum(map(_pairs, m)) + _pairs(rows - t) + pair_share for m, t in zip(mine, tokens))
    return Placement(world, tuple(sorted(cut)), tuple(owner), 2 * sum(pieces) + rows, work,
                     tuple(c + p + cut_share for c, p in zip(cost, pad)))


@dataclass(frozen=True, eq=False)  # identity hash: plans are cached and looked up by their bounds
class DocBalanced:
    """Where every token of a packed row lives under doc_balanced over N ranks.

    Rank r stores `split_len` rows of the cut documents (their doc_zigzag storage, `split` being
    the doc_zigzag plan of the cut documents laid end to end as a row of their own), then its
    whole documents, then a pad document: `whole_cu[r]`, bounds relative to row `split_len`.
    A pad row is its own document, so no real token sees it. At N = 1 the layout is the identity."""
    world: int
    placement: Placement
    split: DocZigzag | None  # None: nothing cut, the ring moves nothing
    split_len: int  # rows that travel round the ring, the same on every rank
    whole_cu: tuple[tuple[int, ...], ...]
    local_len: int
    source: torch.Tensor  # [world, local_len] int64: index of each local row in the unpadded row, -1 for pad
    gathered: torch.Tensor  # [tokens] int64: each token's row in the ranks' shards laid end to end


def doc_balanced_plan(cu_seqlens, world_size: int) -> DocBalanced:
    """The doc_balanced layout of a packed row with document boundaries `cu_seqlens` (list or tensor)."""
    return _balanced(_bounds(cu_seqlens), world_size)


@lru_cache(maxsize=8)  # one plan per micro-batch, asked for by the sharding and by every layer
def _balanced(bounds: tuple[int, ...], world: int) -> DocBalanced:
    total = bounds[-1]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if world == 1:
        every = torch.arange(total)
        return DocBalanced(1, place_documents(lengths, 1), None, 0, (bounds,), total, every[None], every)
    placement = place_documents(lengths, world)
    starts = bounds[:-1]
    split_plan, split_len = None, 0
    split_source = torch.empty(world, 0, dtype=torch.long)
    if placement.split:
        split_lengths = [lengths[d] for d in placement.split]
        split_bounds = tuple([0] + torch.tensor(split_lengths).cumsum(0).tolist())
        split_plan = _plan(split_bounds, world)
        split_len = split_plan.local_len
        to_row = torch.cat([torch.arange(starts[d], starts[d] + lengths[d]) for d in placement.split])
        idx = split_plan.source
        split_source = torch.where(idx >= 0, to_row[idx.clamp(min=0)], -1)
    sources, whole_cu = [], []
    for r in range(world):
        mine = [d for d, o in enumerate(placement.owner) if o == r]
        rows = [torch.arange(starts[d], starts[d] + lengths[d]) for d in mine]
        pad = placement.local_len - split_len - sum(lengths[d] for d in mine)
        cu = [0] + torch.tensor([lengths[d] for d in mine] + ([pad] if pad else []), dtype=torch.long).cumsum(0).tolist()
        whole_cu.append(tuple(cu))
        sources.append(torch.cat([split_source[r], *rows, torch.full((pad,), -1, dtype=torch.long)]))
    source = torch.stack(sources)
    gathered = torch.empty(total, dtype=torch.long)
    real = source.reshape(-1) >= 0
    gathered[source.reshape(-1)[real]] = torch.arange(source.numel())[real]
    return DocBalanced(world, placement, split_plan, split_len, tuple(whole_cu), placement.local_len, source, gathered)
