"""Softmax attention over the cp group by passing K/V around a ring (Ring Self-Attention, Li et al.
2021; Ring Attention, Liu et al. 2023), with zigzag load balance.

Each rank keeps its queries and, in N steps, attends them to the K/V shard of every rank as it
comes by: step s holds the shard of rank (rank - s) mod N. Each block returns (out, lse), merged
online in fp32. The next shard's transfer is posted before the current block's compute.

What is computed per step is decided once, from chunk positions alone (`plan_blocks`): shards
are cut into equal aligned chunks, so a key chunk is before, equal to, or after a query chunk;
under a causal mask "after" is skipped, "before" is a full rectangle and "equal" a causal
diagonal. Documents (cu_seqlens) shrink a rectangle to the one document that spans both chunks
(at most one can) or drop it, and make the diagonal a varlen call. With the zigzag layout every
rank then does the same causal work at every step, for a dense row; with packed documents only
the doc_zigzag layout does (`plan_doc_blocks`: every document is cut in 2N pieces, and a step is
at most 2 causal or 4 non-causal varlen calls over all documents at once). Its pieces are short
(~700 tokens at 64k packed over 2 ranks), which costs the varlen kernel 37 % over its ideal time;
the doc_balanced layout keeps most documents whole on one rank, placed for equal work, and cuts
only the rest doc_zigzag-style (`doc_balanced_schedule`): the own whole documents join step 0's
diagonal call, and only the cut documents' rows travel (no transfer at all when none is cut).

The backward (an autograd.Function, not autograd through P2P) circulates K/V again; the dK/dV of
a visiting shard travel with it (in fp32) and reach home after the last step, dQ stays local; in
a ring of 2 the one hop home carries the block gradients as the kernel wrote them instead. The own
shard's blocks are split around the remote steps, so that the first K/V transfer and the last
dK/dV transfer both overlap compute.

Everything that depends on the sharding alone (`RingPlan`: the blocks, how each block's result
folds into the row buffers -- `ring_fold` -- and the document bounds on the device with their
longest document known on the host) is built once per micro-batch and shared by every layer, so
a layer's call makes no host-device synchronisation and no per-step planning.

Where the kernel takes a causal mask aligned bottom-right as fast as a square one (FA2, seqpar's
Triton kernel: `dispatch.prefix_calls_fast`; not cuDNN), the own blocks the backward runs after the
remote steps (zigzag: the later chunk against the earlier one, then against itself) are one call of
those queries over their whole local prefix (`prefix_tail`).

SEQPAR_RING_KEEP_KV=1 (a ring of 2, opt-in: it costs memory): the forward keeps the peer's K/V, which
it holds after its last step anyway, for the backward. The backward then moves no K/V: it runs the
remote block first, sends its dK/dV home and, while they travel, the own shard's whole causal
attention as the forward's one call (`own_shard_block`), on any kernel family. Per layer it saves
the peer's K/V rows it read beside its own (zigzag, causal: all of them on rank 0, half on rank 1),
where the ring saves its own only.

A ring of 2 moves only the K/V rows the peer's one remote step reads (`RingPlan.send_len`): with
zigzag and a causal mask rank 0's later chunk is the sequence's last, which rank 1 never sees, so
rank 0 sends half its rows (the same ring time on 2 H200, 2026-11-28, fewer bytes and less kept).

A ring of 2 on FA2 runs each pass's first call on a high-priority stream (`Tails`), so that
the second starts in the SMs the first's last wave leaves idle instead of after it; the forward
then posts its K/V shift after the lead's kernel, which the cp group's high-priority NCCL streams
(`parallel.dims.attention_comm_options`) still run beside it.
"""
from __future__ import annotations

import bisect
import contextlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from seqpar.attention.copy_engine import ENV as TRANSPORT_ENV
from seqpar.attention.copy_engine import CopyEngineComm, staged_bytes, transport
from seqpar.attention.ring_fold import fold_grad, fold_out, fold_out_rest, fold_rest, plan_folds
from seqpar.kernels.dispatch import prefix_calls_fast, tails_overlap
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
from seqpar.parallel.doc_balance import DocBalanced
from seqpar.parallel.sharding import DOC_LAYOUTS, document_plan, group_size_rank, host_bounds, local_ranges


KEEP_ENV = "SEQPAR_RING_KEEP_KV"


def keep_kv() -> bool:
    """Whether a ring of 2 keeps the peer's K/V from the forward for the backward (SEQPAR_RING_KEEP_KV=1)."""
    choice = os.environ.get(KEEP_ENV, "").strip() or "0"
    if choice not in ("0", "1"):
        raise ValueError(f"{KEEP_ENV}={choice!r} is not one of: 0, 1 (1: a ring of 2 keeps the peer's K/V for the "
                         f"backward, memory for speed)")
    return choice == "1"


@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows `q` against visiting key rows `k`."""
    q: slice
    k: slice
    causal: bool
    cu: tuple[int, ...] | None = None  # document bounds shared by q and k rows (varlen), else dense
    cu_k: tuple[int, ...] | None = None  # set when the key rows' documents differ: `cu` is then the queries'

    @property
    def full(self) -> bool:  # every query sees every key
        return not self.causal and self.cu is None

    def work(self, batch: int = 1) -> int:
        """Query-key pairs computed (the cost model of the imbalance figures)."""
        if self.cu_k is not None:
            pairs = zip(_lengths(self.cu), _lengths(self.cu_k))
            return sum(_visible(nq, nk) if self.causal else nq * nk for nq, nk in pairs)
        if self.cu is not None:
            lengths = [b - a for a, b in zip(self.cu[:-1], self.cu[1:])]
            return sum(n * (n + 1) // 2 if self.causal else n * n for n in lengths)
        nq, nk = self.q.stop - self.q.start, self.k.stop - self.k.start
        return batch * (nq * (nq + 1) // 2 if self.causal else nq * nk)


def plan_blocks(q_ranges, k_ranges, bounds, causal) -> list[Block]:
    """Blocks of local queries (global row ranges `q_ranges`, in storage order) against a shard
    holding `k_ranges`; `bounds` are the document boundaries of a packed row or None."""
    blocks = []
    for (a, b), qo in zip(q_ranges, _offsets(q_ranges)):
        for (c, d), ko in zip(k_ranges, _offsets(k_ranges)):
            if c == a:
                cu = None if bounds is None else tuple([0] + [x - a for x in bounds if a < x < b] + [b - a])
                if cu is not None and len(cu) == 2:
                    cu = None  # one document covers the chunk: a dense call
                blocks.append(Block(slice(qo, qo + b - a), slice(ko, ko + d - c), causal, cu))
            elif causal and c > a:
                continue
            elif bounds is None:
                blocks.append(Block(slice(qo, qo + b - a), slice(ko, ko + d - c), False))
            else:
                for ds, de in zip(bounds[:-1], bounds[1:]):
                    qs, qe, ks, ke = max(a, ds), min(b, de), max(c, ds), min(d, de)
                    if qs < qe and ks < ke:
                        blocks.append(Block(slice(qo + qs - a, qo + qe - a), slice(ko + ks - c, ko + ke - c), False))
    return _coalesce(blocks)


def plan_doc_blocks(q_halves, k_halves, bounds, causal) -> list[Block]:
    """Blocks of local queries against a visiting shard under doc_zigzag (`DocZigzag`).

    A half is one piece per document, each with the same piece index, stored end to end; the
    halves' pieces sit at the same relative place in every document, so a pair of halves is one
    kernel call over all documents: a causal diagonal (the same pieces, with `bounds` inside
    them), a full rectangle per document (key piece before query piece; separate q and k
    document bounds, since a pad tail is its own document) or nothing (key piece after)."""
    blocks = []
    for qh, qo in zip(q_halves, _offsets([(0, _span(h)) for h in q_halves])):
        for kh, ko in zip(k_halves, _offsets([(0, _span(h)) for h in k_halves])):
            rel = {_relation(q, k, causal) for q, k in zip(qh, kh)}
            if len(rel) != 1:
                raise AssertionError(f"doc_zigzag halves out of step: {qh} vs {kh}")
            rel = rel.pop()
            if rel == "skip":
                continue
            nq, nk = _span(qh), _span(kh)
            if rel == "diagonal":
                blocks.append(Block(slice(qo, qo + nq), slice(ko, ko + nk), causal, _piece_bounds(qh, bounds)))
            else:
                cu_q, cu_k = _paired_bounds(qh, kh, bounds)
                blocks.append(Block(slice(qo, qo + nq), slice(ko, ko + nk), False, cu_q, cu_k))
    return _join_diagonals(blocks)


def _span(half):
    return sum(b - a for a, b in half)


def _relation(q, k, causal):
    if q[0] == k[0]:
        return "diagonal"
    return "skip" if causal and k[0] > q[0] else "full"


def _piece_bounds(half, bounds):
    """Document bounds of pieces stored end to end, relative to the first row."""
    cu, pos = [0], 0
    for a, b in half:
        lo, hi = bisect.bisect_right(bounds, a), bisect.bisect_left(bounds, b)
        cu += [pos + x - a for x in bounds[lo:hi]] + [pos + b - a]
        pos += b - a
    return tuple(cu)


def _paired_bounds(q_half, k_half, bounds):
    """(cu_q, cu_k) pairing, document by document, the query piece's rows with the key piece's
    rows of the same (real or pad) document; either side may be empty."""
    cu_q, cu_k, pq, pk = [0], [0], 0, 0
    for (a, b), (c, d) in zip(q_half, k_half):
        lo, hi = min(a, c), max(b, d)
        cuts = [lo] + bounds[bisect.bisect_right(bounds, lo):bisect.bisect_left(bounds, hi)] + [hi]
        for s, e in zip(cuts[:-1], cuts[1:]):
            nq, nk = max(0, min(b, e) - max(a, s)), max(0, min(d, e) - max(c, s))
            if nq or nk:
                pq, pk = pq + nq, pk + nk
                cu_q.append(pq)
                cu_k.append(pk)
    return tuple(cu_q), tuple(cu_k)


def _join_diagonals(blocks):
    """Step 0's diagonals of the first and of the second pieces cover adjacent rows: one call."""
    diagonals = [b for b in blocks if b.cu_k is None]
    joined = diagonals[:1]
    for blk in diagonals[1:]:
        prev = joined[-1]
        if prev.causal == blk.causal and prev.q == prev.k and blk.q == blk.k and prev.q.stop == blk.q.start:
            cu = prev.cu + tuple(x + prev.cu[-1] for x in blk.cu[1:])
            joined[-1] = Block(slice(prev.q.start, blk.q.stop), slice(prev.k.start, blk.k.stop), blk.causal, cu)
        else:
            joined.append(blk)
    return joined + [b for b in blocks if b.cu_k is not None]


def _lengths(cu):
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def _visible(nq, nk):
    """Causal pairs of nq queries and nk keys aligned bottom-right (query i sees nk - nq + i + 1 keys)."""
    return sum(max(0, min(nk, nk - nq + i + 1)) for i in range(nq))


def _offsets(ranges):
    out, pos = [], 0
    for a, b in ranges:
        out.append(pos)
        pos += b - a
    return out


def _coalesce(blocks):
    """Join full rectangles that share their query rows and have adjacent key rows (or the
    reverse): fewer, larger kernel calls (zigzag's "all queries against the first key chunk")."""
    blocks = list(blocks)
    for i in range(len(blocks)):
        for j in range(len(blocks)):
            a, b = blocks[i], blocks[j]
            if i == j or not (a.full and b.full):
                continue
            if a.q == b.q and a.k.stop == b.k.start:
                joined = Block(a.q, slice(a.k.start, b.k.stop), False)
            elif a.k == b.k and a.q.stop == b.q.start:
                joined = Block(slice(a.q.start, b.q.stop), a.k, False)
            else:
                continue
            rest = [x for n, x in enumerate(blocks) if n not in (i, j)]
            return _coalesce(rest[:min(i, j)] + [joined] + rest[min(i, j):])
    return blocks


def ring_schedule(held, rank, bounds, causal) -> list[list[Block]]:
    """Blocks of each ring step of `rank`; step s visits the shard of rank (rank - s) mod N."""
    world = len(held)
    return [plan_blocks(held[rank], held[(rank - s) % world], bounds, causal) for s in range(world)]


def own_shard_block(ranges, bounds, causal) -> Block | None:
    """The own shard's attention (step 0) as ONE call, for the forward: held ranges in ascending
    order make a causal mask over the local rows exactly the global one (a later chunk sees all of
    an earlier one), and a document that crosses the junction of two ranges continues there. The
    same work as step 0's blocks, in one launch and with no merge between its parts. None when the
    ranges are not in order. (The backward keeps step 0's blocks: it splits them around the remote
    steps to hide the first and the last transfers.)"""
    if any(b > c for (_, b), (c, _) in zip(ranges, ranges[1:])):
        return None
    cu, pos = [0], 0
    for i, (a, b) in enumerate(ranges):
        if bounds is not None:
            if i and pos > cu[-1] and any(ranges[i - 1][1] <= x <= a for x in bounds):
                cu.append(pos)  # a document ends or starts at the junction
            cu += [pos + x - a for x in bounds if a < x < b]
        pos += b - a
    cu.append(pos)
    rows = slice(0, pos)
    return Block(rows, rows, causal, tuple(cu) if len(cu) > 2 else None)


def prefix_tail(blocks) -> list[Block]:
    """The own shard's blocks that the backward runs after the remote steps, as calls over a prefix:
    a full rectangle followed by the causal diagonal of the same query rows whose key rows it
    continues (zigzag: a rank's later chunk against its earlier chunk, then against itself) is
    one causal call of those queries over both key ranges, aligned bottom-right (a varlen call of
    one document). One launch instead of two (FA2 at 32k over 2 ranks: ~0.9 ms less kernel time in
    the sixteenth session's probe) and one result per query row to fold instead of two."""
    out: list[Block] = []
    for blk in blocks:
        prev = out[-1] if out else None
        square = blk.q.stop - blk.q.start == blk.k.stop - blk.k.start
        if (prev is not None and prev.full and blk.causal and blk.cu is None and blk.cu_k is None and square
                and prev.q == blk.q and prev.k.stop == blk.k.start):
            nq, nk = blk.q.stop - blk.q.start, blk.k.stop - prev.k.start
            out[-1] = Block(blk.q, slice(prev.k.start, blk.k.stop), True, (0, nq), (0, nk))
        else:
            out.append(blk)
    return out


@lru_cache(maxsize=8)  # every layer of a micro-batch asks for the same plan (cached by sharding)
def doc_ring_schedule(plan, rank, causal) -> list[list[Block]]:
    """ring_schedule for the doc_zigzag layout `plan` (a sharding.DocZigzag)."""
    world, bounds = plan.world, list(plan.bounds)
    return [plan_doc_blocks(plan.halves[rank], plan.halves[(rank - s) % world], bounds, causal) for s in range(world)]


@lru_cache(maxsize=8)
def doc_balanced_schedule(plan, rank, causal) -> list[list[Block]]:
    """ring_schedule for the doc_balanced layout `plan` (a doc_balance.DocBalanced): the cut
    documents' doc_zigzag schedule over the first `split_len` rows, and the rank's whole documents
    (with its pad document) joined to step 0's diagonal call. Nothing cut: one step, no transfer."""
    steps = [list(step) for step in doc_ring_schedule(plan.split, rank, causal)] if plan.split else [[]]
    if plan.local_len > plan.split_len:
        rows = slice(plan.split_len, plan.local_len)
        steps[0] = _join_diagonals(steps[0] + [Block(rows, rows, causal, plan.whole_cu[rank])])
    return steps


class RingPlan:
    """What a ring call does that depends on the sharding alone, worked out once and shared by
    every layer of a micro-batch: the blocks of each step, how each block's result folds into
    the row buffers (`ring_fold`), and the document bounds on the device. `travel_len`: the
    leading K/V rows that go round the ring (doc_balanced: the cut documents'), by default all.
    `keep`: a ring of 2 keeps the peer's K/V for the backward (`keep_kv`)."""

    def __init__(self, steps: list[list[Block]], q_len: int, k_len: int, peer_last: list[Block] | None = None,
                 own: Block | None = None, travel_len: int | None = None, prefix: bool = False, keep: bool = False):
        self.steps = steps
        self.keep = keep and len(steps) == 2
        if self.keep:  # no K/V transfer to hide: the remote block first, then the own shard at once
            self.first, own_blocks = [], [own] if own is not None else steps[0]
        else:  # the first own block hides the first K/V transfer, the rest (`tail`) the last dK/dV one
            self.first, own_blocks = steps[0][:1], steps[0][1:]
        # `prefix`: the own blocks joined into calls over a prefix, where the kernel takes a causal
        # mask aligned bottom-right as fast (`prefix_calls_fast`)
        self.tail = prefix_tail(own_blocks) if prefix else own_blocks
        self.travel_len = k_len if travel_len is None else travel_len
        self.fwd_steps = steps if own is None else [[own]] + steps[1:]
        self.out = plan_folds([b.q for blocks in self.fwd_steps for b in blocks], q_len, final=True, pairs=True)
        self.out_kept, self.out_released = self.out.kept, self.out.released
        self.dq = plan_folds([b.q for b in self.backward_order()], q_len, final=True, pairs=True, trios=True)
        self.dq_kept, self.dq_released = self.dq.kept, self.dq.released
        # dK/dV of a visiting shard: fresh at step 1, then on top of the ranks' before it
        self.travel = [None] + [plan_folds([b.k for b in steps[s]], self.travel_len, final=False, base=s >= 2,
                                           pairs=True, trios=True) for s in range(1, len(steps))]
        # Ring of 2: the one hop home carries the previous rank's block gradients as the kernel
        # wrote them (exact, in the inputs' dtype), folded here with the own ones; nothing is
        # folded, zero-filled or widened to fp32 before the transfer, and half the bytes move.
        self.raw_hop = len(steps) == 2
        self.peer_last = peer_last if self.raw_hop else None
        # The K/V rows that leave (`send_len`) and arrive (`recv_len`): a ring of 2 sends only the
        # leading rows its peer's one remote step reads (zigzag, causal: the earlier chunk; the later
        # one is the sequence's last, which no other rank sees), in the forward and in the backward's
        # shift; a longer ring moves `travel_len` rows on every hop.
        if self.raw_hop:
            self.send_len = max((b.k.stop for b in peer_last), default=0)
            self.recv_len = max((b.k.stop for b in steps[1]), default=0)
        else:
            self.send_len = self.recv_len = self.travel_len
        own = [b.k for b in self.first + self.tail]
        if self.raw_hop:
            self.home = plan_folds(own + [b.k for b in peer_last], k_len, final=True, pairs=True, trios=True)
        else:
            # rows that travelled come home with the other ranks' sums; the rest never left
            self.home = plan_folds(own, k_len, final=True, base=self.travel_len if len(steps) > 1 else 0, pairs=True,
                                   trios=True)
        self._bounds: dict[torch.device, BoundTensors] = {}

    def backward_order(self) -> list[Block]:
        """The own shard's blocks around the remote steps: `first` hides the first K/V transfer,
        `tail` the last dK/dV transfer."""
        return self.first + [b for blocks in self.steps[1:] for b in blocks] + self.tail

    def exchange_bytes(self, k, v) -> tuple[tuple, int, torch.device]:
        """(key, bytes, device) of the largest exchange a call of this plan makes on this rank, fwd
        or bwd (what a staging buffer must hold): the K/V shift, and the dK/dV hop home (a ring of 2:
        the block gradients as the kernels wrote them, both ways) or the fp32 dK/dV travelling on."""
        row = [t[0, :1].numel() * t.element_size() * t.shape[0] for t in (k, v)]  # bytes per K / V row
        sizes = lambda counts, scale=1: [n * r * scale for n in counts for r in row]
        kv = staged_bytes(sizes([max(self.send_len, self.recv_len)]))
        if self.raw_hop:
            own, peer = ([b.k.stop - b.k.start for b in blocks] for blocks in (self.steps[1], self.peer_last))
            grads = max(staged_bytes(sizes(own)), staged_bytes(sizes(peer)))
        else:  # the running sums travel in fp32 (fp64 for fp64 inputs)
            grads = staged_bytes(sizes([self.travel_len], _acc_dtype(k.dtype).itemsize // k.element_size()))
        return (self, k.dtype, tuple(k.shape), tuple(v.shape)), max(kv, grads), k.device

    def bounds(self, device: torch.device) -> "BoundTensors":
        if device not in self._bounds:
            self._bounds[device] = BoundTensors(self.fwd_steps + self.steps + [self.tail], device)
        return self._bounds[device]


@lru_cache(maxsize=8)
def _doc_ring_plan(plan, rank, causal, keep=False) -> RingPlan:
    if isinstance(plan, DocBalanced):
        schedule, travel = doc_balanced_schedule, plan.split_len
    else:
        schedule, travel = doc_ring_schedule, None
    steps = schedule(plan, rank, causal)
    peer = schedule(plan, (rank - 1) % plan.world, causal)[-1] if len(steps) == 2 else None
    return RingPlan(steps, plan.local_len, plan.local_len, peer, travel_len=travel, keep=keep)


@lru_cache(maxsize=16)
def _held_ring_plan(held, rank, bounds, causal, prefix=False, keep=False) -> RingPlan:
    held, bounds = [list(h) for h in held], None if bounds is None else list(bounds)
    steps = ring_schedule(held, rank, bounds, causal)
    peer = ring_schedule(held, (rank - 1) % len(held), bounds, causal)[-1] if len(held) == 2 else None
    rows = sum(b - a for a, b in held[rank])
    return RingPlan(steps, rows, rows, peer, own_shard_block(held[rank], bounds, causal), prefix=prefix, keep=keep)


def ring_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="zigzag"):
    world, rank = group_size_rank(group)
    if layout in DOC_LAYOUTS and world > 1:  # at world 1 the layout is the identity: the plain path
        if q.shape[0] != 1:
            raise ValueError(f"layout {layout} needs a packed row (batch size 1), got q of shape {tuple(q.shape)}")
        plan = document_plan(layout, cu_seqlens, world)
        if q.shape[1] != plan.local_len:
            raise ValueError(f"{layout}: rank {rank} holds {q.shape[1]} rows, but shard_sequence cuts these "
                             f"cu_seqlens into {plan.local_len} per rank")
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        return _RingAttention.apply(q, k, v, group, _doc_ring_plan(plan, rank, bool(causal), keep_kv()), scale)
    if layout in DOC_LAYOUTS:
        layout = "contiguous"
    seq_len = q.shape[1] * world
    held = [local_ranges(seq_len, world, r, layout) for r in range(world)]
    return ring_attention_held(q, k, v, held, group=group, causal=causal, cu_seqlens=cu_seqlens,
                               softmax_scale=softmax_scale)


def ring_attention_held(q, k, v, held, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None):
    """Ring attention where ring rank r holds the global row ranges `held[r]` (in storage order);
    usp passes the union of a Ulysses group's shards."""
    world, rank = group_size_rank(group)
    if len(held) != world or q.shape[1] != sum(b - a for a, b in held[rank]):
        raise ValueError(f"rank {rank} of a ring of {world} holds {q.shape[1]} rows, not the ranges {held[rank]}")
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got q of shape {tuple(q.shape)}")
    bounds = None if cu_seqlens is None else host_bounds(cu_seqlens)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    key = tuple(tuple(tuple(r) for r in ranges) for ranges in held)
    # a prefix call is a varlen call of one document: one row (batch 1)
    prefix = bool(causal) and q.shape[0] == 1 and prefix_calls_fast(q, k, v)
    plan = _held_ring_plan(key, rank, bounds, bool(causal), prefix, keep_kv())
    return _RingAttention.apply(q, k, v, group, plan, scale)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale):
        comm, steps = RingComm(group), plan.fwd_steps
        comm.reserve(plan, k, v)
        bounds = plan.bounds(q.device)
        acc_dtype = _acc_dtype(q.dtype)
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        acc = _accumulator(out, acc_dtype, plan.out)
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=acc_dtype)
        fold_out_rest(plan.out, out, lse)
        kv = (k.contiguous(), v.contiguous())  # only the Hkv heads travel (GQA)
        tails = Tails(len(steps) == 2 and tails_overlap(q, k, v), q.device)
        kept, n = {}, [0]  # results whose rows' next result merges with them, by number

        def fold(o, l):
            i = n[0]
            fold_out(plan.out.runs[i], o, l, acc, lse, out, kept)
            if plan.out_kept[i]:
                kept[i] = o
            for done in plan.out_released[i]:
                del kept[done]
            n[0] += 1

        def post(step):  # the K/V held at `step` to the next rank; none after the last step
            return comm.shift(_travelling(kv, plan) if step == 0 else kv, plan.recv_len) \
                if step + 1 < len(steps) else None

        # Posting a transfer takes the host ~0.8 ms (NCCL). On one stream it goes first: a transfer
        # waits for the kernels before it on its stream. With the lead on a stream of its own, the
        # lead's kernel goes first and the GPU does not wait for the post (on 2 H200 at 32k, with
        # the cp group's streams at high priority: 49.35 / 49.50 ms against 49.76 / 49.93 posting
        # first, 2026-11-28-gpu-33rd/call1; at normal priority the transfer queued behind the
        # lead's blocks and nothing was gained, 2026-11-28-gpu-32nd/call6).
        post_first = tails.stream is None
        for step, blocks in enumerate(steps):
            pending = post(step) if post_first else None
            k_vis, v_vis = kv
            later = []  # a follower's results, folded once the lead is done
            with tails.lead(step == 0):
                for blk in blocks:
                    o, l = flash_attn(q[:, blk.q], k_vis[:, blk.k], v_vis[:, blk.k], causal=blk.causal,
                                      softmax_scale=scale, return_lse=True, **bounds(blk))
                    if tails.on and step > 0:
                        later.append((o, l))
                    else:
                        fold(o, l)
            if not post_first:
                pending = post(step)
            if later:
                tails.join()
            for o, l in later:
                fold(o, l)
            if pending is not None:
                kv = pending.wait()
        ctx.save_for_backward(q, k, v, out, lse, *(kv if plan.keep else ()))  # keep: kv is the peer's
        ctx.group, ctx.plan, ctx.scale = group, plan, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *kept_kv = ctx.saved_tensors
        plan, comm = ctx.plan, RingComm(ctx.group)
        comm.reserve(plan, k, v)
        steps, bounds = plan.steps, plan.bounds(q.device)
        dout = dout.contiguous()
        acc_dtype = _acc_dtype(q.dtype)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dq_acc = _accumulator(dq, acc_dtype, plan.dq)
        fold_rest(plan.dq, dq_acc, dq)
        kv = (k.contiguous(), v.contiguous())
        tails = Tails(plan.raw_hop and tails_overlap(q, k, v), q.device)
        dq_kept, n = {}, [0]

        def block_grads(blk, kv_vis):
            k_vis, v_vis = kv_vis
            return flash_attn_backward(
                dout[:, blk.q], q[:, blk.q], k_vis[:, blk.k], v_vis[:, blk.k], out[:, blk.q], lse[:, :, blk.q],
                causal=blk.causal, softmax_scale=ctx.scale, **bounds(blk))

        def fold_dq(dq_b):
            i = n[0]
            fold_grad(plan.dq.runs[i], dq_b, dq_acc, dq, dq_kept)
            if plan.dq_kept[i]:
                dq_kept[i] = dq_b
            for done in plan.dq_released[i]:
                del dq_kept[done]
            n[0] += 1

        def grads(blk, kv_vis):
            dq_b, dk_b, dv_b = block_grads(blk, kv_vis)
            fold_dq(dq_b)
            return dk_b, dv_b

        def fold_kv(folds, results, accs, finals):
            kept_k, kept_v = dict(enumerate(r[0] for r in results)), dict(enumerate(r[1] for r in results))
            for (dk_b, dv_b), runs in zip(results, folds.runs):
                fold_grad(runs, dk_b, accs[0], finals[0], kept_k)
                fold_grad(runs, dv_b, accs[1], finals[1], kept_v)

        pending_kv = comm.shift(_travelling(kv, plan), plan.recv_len) if len(steps) > 1 and not plan.keep else None
        home = [grads(blk, kv) for blk in plan.first]  # hides the first K/V transfer
        pending_dkv, home_accs = None, None
        for step in range(1, len(steps)):
            if plan.raw_hop:  # home as they are; the previous rank's come back the same way
                with tails.lead():
                    kv_vis = tuple(kept_kv) if plan.keep else pending_kv.wait()
                    sent = [t.contiguous() for blk in steps[step] for t in grads(blk, kv_vis)]
                    recv = [t.new_empty((t.shape[0], blk.k.stop - blk.k.start) + t.shape[2:])
                            for blk in plan.peer_last for t in kv]
                    pending_dkv = comm.exchange(sent, recv)
                continue
            kv_vis = pending_kv.wait()
            pending_kv = comm.shift(kv_vis, plan.recv_len) if step + 1 < len(steps) else None
            folds = plan.travel[step]
            if pending_dkv is None:  # step 1: this shard's dK/dV start here, in fp32
                dkv = tuple(t.new_empty(t.shape, dtype=acc_dtype) for t in kv_vis)
                for t in dkv:
                    fold_rest(folds, t, None)
                fold_kv(folds, [grads(blk, kv_vis) for blk in steps[step]], dkv, (None, None))
            else:  # on top of the sum of the ranks this shard visited before, once it is here
                results = [grads(blk, kv_vis) for blk in steps[step]]
                dkv = pending_dkv.wait()
                fold_kv(folds, results, dkv, (None, None))
            if step + 1 == len(steps) and 0 < plan.home.base < k.shape[1]:
                # home to the leading rows of this shard's accumulators: the rest never travelled
                dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
                home_accs = tuple(_home_accumulator(t, acc_dtype) for t in (dk, dv))
                pending_dkv = comm.exchange(dkv, tuple(a[:, :plan.home.base] for a in home_accs))
            else:
                pending_dkv = comm.shift(dkv)  # after the last step this hop takes it home
        if tails.on:  # hides the last dK/dV transfer; its dQ folds once the lead's is done
            tail = [block_grads(blk, kv) for blk in plan.tail]
            tails.join()
            for dq_b, dk_b, dv_b in tail:
                fold_dq(dq_b)
                home.append((dk_b, dv_b))
        else:
            home += [grads(blk, kv) for blk in plan.tail]  # hides the last dK/dV transfer
        if home_accs is not None:  # dk and dv were made with them
            pending_dkv.wait()
            accs = home_accs
        elif plan.home.base:
            dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
            accs = pending_dkv.wait()
        else:
            dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
            if pending_dkv is not None:
                peer = pending_dkv.wait()
                home += list(zip(peer[0::2], peer[1::2]))
            accs = (_accumulator(dk, acc_dtype, plan.home), _accumulator(dv, acc_dtype, plan.home))
        for acc, final in zip(accs, (dk, dv)):
            fold_rest(plan.home, acc, final)
        fold_kv(plan.home, home, accs, (dk, dv))
        return dq, dk, dv, None, None, None


def _travelling(kv, plan):
    """The leading rows of the own K/V that leave this rank (views where B = 1: its rows are
    contiguous; a copy of the rows otherwise)."""
    rows = plan.send_len
    return kv if rows == kv[0].shape[1] else tuple(t[:, :rows].contiguous() for t in kv)


def _home_accumulator(final, acc_dtype):
    """The fp32 (or wider) buffer of a shard's dK or dV whose leading rows come home with the
    other ranks' sums: the final buffer itself when it has that dtype."""
    return final if final.dtype == acc_dtype else torch.empty(final.shape, dtype=acc_dtype, device=final.device)


def _acc_dtype(dtype):
    """The dtype results merge in: fp32, or the inputs' own when wider (the fp64 tests)."""
    return torch.promote_types(dtype, torch.float32)


def _accumulator(final, dtype, folds):
    """The fp32 (or wider) buffer that a final buffer's rows of several results merge in; the
    final buffer itself when it has that dtype or no row takes more than one result."""
    if final.dtype == dtype or not folds.needs_acc:
        return final
    return torch.empty(final.shape, dtype=dtype, device=final.device)


class BoundTensors:
    """The blocks' document bounds as the kernels' keyword arguments, all of a plan's steps copied
    to the device at once and kept with the plan (every layer and the backward share them): one
    copy from pinned memory per plan, instead of a copy per bound from pageable memory, each of
    which waits for the stream to drain before it starts (CUDA's rule for pageable host-to-device
    copies). Each carries its longest document as `seqpar_max_seqlen`, which the aten varlen
    kernels need on the host, and its values as `seqpar_bounds` (the split's tasks): reading them
    from the device would synchronise the host per call."""

    def __init__(self, steps, device):
        bounds = list(dict.fromkeys(cu for blocks in steps for blk in blocks for cu in (blk.cu, blk.cu_k) if cu))
        flat = [x for cu in bounds for x in cu]
        host = torch.tensor(flat, dtype=torch.int32)
        if device.type == "cuda" and flat:
            host = host.pin_memory()
        dev = host.to(device, non_blocking=True)
        self.cache, start = {}, 0
        for cu in bounds:
            view = dev[start:start + len(cu)]
            view.seqpar_max_seqlen = max(b - a for a, b in zip(cu[:-1], cu[1:]))
            view.seqpar_bounds = tuple(cu)  # the split's tasks, without a device read
            self.cache[cu] = view
            start += len(cu)

    def tensor(self, cu):
        return self.cache[cu]

    def __call__(self, blk) -> dict:
        if blk.cu_k is not None:
            return {"cu_seqlens_q": self.tensor(blk.cu), "cu_seqlens_k": self.tensor(blk.cu_k)}
        return {"cu_seqlens": None if blk.cu is None else self.tensor(blk.cu)}


class Tails:
    """A ring of 2 runs two kernel calls in a row per pass (forward: the own shard's, then the remote
    block; backward: the remote block, then the own shard's): the second cannot start on the same
    stream until the first's last, partial wave of thread blocks is done, SMs idle meanwhile. `lead()`
    runs the first on a high-priority stream, so the second, issued on the caller's stream, fills the
    SMs the lead leaves idle and never delays it; `join()` orders the caller's stream after the lead
    before the results meet. Only where the kernel family gains (`dispatch.tails_overlap`: FA2; the
    ring at 32k on 2 H200 0.943-0.946 against 0.937-0.938, 2026-11-28-gpu-32nd/call3). Off (or
    on CPU, where there are no streams) the calls run in order; on, the caller also folds a follower's
    results after the join, which CPU tests check by forcing `on`."""

    _streams: dict = {}

    def __init__(self, on: bool, device: torch.device):
        self.on = on
        self.stream = None
        if on and device.type == "cuda":
            if device not in Tails._streams:
                Tails._streams[device] = torch.cuda.Stream(device, priority=-1)
            self.stream = Tails._streams[device]

    @contextlib.contextmanager
    def lead(self, active: bool = True):
        if self.stream is None or not active:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        # Buffers made on the lead stream and freed on the caller's are safe without record_stream:
        # the lead's next work waits for the caller's stream first (`lead`).
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


class RingComm:
    """Sends a buffer to the next rank of the ring while receiving the previous rank's.

    Asynchronous (batch_isend_irecv): on NCCL the transfer runs on the communicator's own CUDA
    stream, so compute issued on the current stream before `wait()` overlaps it; on gloo the
    work runs on gloo's threads. A fresh receive buffer per shift is the double buffer: the one
    being read by compute is never the one being written. SEQPAR_RING_TRANSPORT=copy moves the
    bytes by the copy engines instead (`copy_engine`: one node, no SM taken from the compute)."""

    def __init__(self, group):
        self.group = group
        self.world, rank = group_size_rank(group)
        self.copy = None
        if self.world > 1:
            to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
            self.next, self.prev = to_global((rank + 1) % self.world), to_global((rank - 1) % self.world)
            if transport() == "copy":
                if dist.get_backend(group) != "nccl":
                    raise ValueError(f"{TRANSPORT_ENV}=copy needs CUDA tensors and an NCCL process group (the GPUs "
                                     f"of one node), not backend {dist.get_backend(group)}: unset it")
                self.copy = CopyEngineComm(group, self.next, self.prev)

    def reserve(self, plan, k, v) -> None:
        """Room for the largest exchange of a call of `plan` on these K/V, agreed over the group once
        per plan and shapes (the copy engines' staging buffer; nothing to do for NCCL)."""
        if self.copy is not None:
            self.copy.reserve(*plan.exchange_bytes(k, v))

    def shift(self, tensors, rows=None) -> "Pending":
        """Send `tensors` (contiguous, [B, S, ...]) on, receive the previous rank's: of the same
        shapes, or of `rows` rows; K and V go as two messages of one batch rather than one packed copy."""
        shape = lambda t: t.shape if rows is None else (t.shape[0], rows) + t.shape[2:]  # noqa: E731
        return self.exchange(tensors, tuple(t.new_empty(shape(t)) for t in tensors))

    def exchange(self, send, recv) -> "Pending":
        """Send the tensors `send` to the next rank while receiving the previous rank's into `recv`
        (empty ones are left out: the peer leaves out its side of them too)."""
        if self.copy is not None:
            return self.copy.exchange(send, recv)
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send if t.numel()]
        ops += [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in recv if b.numel()]
        return Pending(dist.batch_isend_irecv(ops) if ops else [], tuple(recv), send)


class Pending:
    """Posted transfers: `wait()` makes the current stream wait for them and returns the receive buffers."""

    def __init__(self, works, buf, sent):
        self.works, self.buf, self.sent = works, buf, sent  # `sent` stays referenced until the send is done

    def wait(self) -> tuple[torch.Tensor, ...]:
        for w in self.works:
            w.wait()
        self.sent = None
        return self.buf
