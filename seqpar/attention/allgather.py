"""Softmax attention over the cp group by gathering K and V (Llama 3's context parallelism).

The backward makes ONE kernel call per query range a rank holds (as `shard_sequence` cut it;
adjacent pieces are one range): its queries against the keys of their documents up to its last row,
causal aligned bottom-right (a query sees every key before it, whoever holds it), from the merged
(out, lse). So no dq is summed from parts and a range's keys get one dK/dV per call, where the ring
makes a call per visiting shard and folds each result. The forward runs a causal range as two parts:
its own rows' keys first, while the other ranks' rows arrive, then the keys before them, merged into
the first part's (out, lse) in place; a range that reads only own rows is one call. The price is
memory: a rank keeps, for its backward, every key row its queries see (zigzag: the whole row on rank
0), where the ring keeps its own shard; so this is the method for moderate lengths (and GQA's small
K/V), the ring the one for the longest.

Transfers: a rank receives only the key rows its queries see (causal: none after its last row),
straight into their place in one buffer, and sends its own rows to the ranks that see them, in one
batch of point-to-point transfers. The backward runs the calls that read other ranks' rows first,
posts their dK/dV home, and runs the local-only calls while they travel. A key row's dK/dV is summed
over the calls and ranks that saw it in fp32, rounded once.

Layouts `contiguous` and `zigzag` (the document layouts cut by documents: ring only).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from itertools import accumulate
from functools import lru_cache

import torch
import torch.distributed as dist

from seqpar.attention.ring import Block, BoundTensors, Pending, _acc_dtype
from seqpar.kernels.block_sum import block_sum_
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward, flash_attn_merge_
from seqpar.parallel.sharding import DOC_LAYOUTS, group_size_rank, host_bounds, local_ranges


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of the packed row that rank `owner` holds from local row `local` on."""
    owner: int
    start: int
    stop: int
    local: int


@dataclass
class RankPlan:
    """One rank's calls and transfers. Blocks: `q` local query rows, `k` rows of the key buffer,
    which holds the packed row's rows [lo, hi); `cu`/`cu_k` the documents of both sides.

    `calls`: one per query range over its whole prefix, the backward's (those reading other ranks'
    rows first). The forward runs `fwd_first` while the rows arrive (local-only calls, and the own
    rows' part of the others) and `fwd_then` after, each (block, merged into its rows' earlier part)."""
    lo: int
    hi: int
    calls: list[Block]
    remote: list[bool]  # per call: reads other ranks' rows
    fwd_first: list[Block]
    fwd_then: list[tuple[Block, bool]]
    own: list[Segment]  # own rows the calls read (copied into the buffer)
    recv: list[Segment]  # other ranks' rows the calls read (received into the buffer)
    pieces: list[Segment]  # every row the rank holds, in storage order
    # (peer, segment) of own rows other ranks read, in the order their plans list them (so the
    # point-to-point pairs match): K/V go out this way, their dK/dV come back the same way
    theirs: list[tuple[int, Segment]] = field(default_factory=list)

    def __post_init__(self):
        self._bounds: dict[torch.device, BoundTensors] = {}

    def backward_order(self) -> list[Block]:
        """Calls on other ranks' rows first: their dK/dV go home while the local-only calls compute."""
        return [c for c, r in zip(self.calls, self.remote) if r] + [c for c, r in zip(self.calls, self.remote) if not r]

    def bounds(self, device) -> BoundTensors:
        if device not in self._bounds:
            blocks = self.calls + self.fwd_first + [b for b, _ in self.fwd_then]
            self._bounds[device] = BoundTensors([blocks], device)
        return self._bounds[device]


@lru_cache(maxsize=16)  # every layer of a micro-batch passes the same shapes and documents
def gather_plan(rows: int, seq_len: int, world: int, layout: str, bounds: tuple[int, ...], causal: bool
                ) -> list[RankPlan]:
    """Every rank's plan (a rank needs the others' to know what to send them) for a packed row of
    `rows` rows made of equal sequences of `seq_len` rows, each cut by `layout`, with documents
    `bounds` (global boundaries, sequence edges among them)."""
    local_len = seq_len // world
    pieces = []
    for r in range(world):
        held_r = local_ranges(seq_len, world, r, layout)
        offsets = list(accumulate((b - a for a, b in held_r[:-1]), initial=0))  # in local storage
        pieces.append([Segment(r, row * seq_len + a, row * seq_len + b, row * local_len + off)
                       for row in range(rows // seq_len) for (a, b), off in zip(held_r, offsets)])
    held = sorted((s for ps in pieces for s in ps), key=lambda s: s.start)
    plans = []
    for r in range(world):
        ranges = _ranges(pieces[r])
        calls = [_call(p, bounds, causal) for p in ranges]
        lo, hi = min(ks for _, ks, _ in calls), max(ke for _, _, ke in calls)
        # the rows the calls read, cut where a call's keys start or end: a call's dK/dV covers
        # each such segment whole or not at all
        cuts = sorted({x for _, ks, ke in calls for x in (ks, ke)} | {x for s in held for x in (s.start, s.stop)})
        needed = _union([(ks, ke) for _, ks, ke in calls])
        seen = [Segment(s.owner, a, b, s.local + a - s.start) for s in held for ks, ke in needed
                for a, b in _cut(max(s.start, ks), min(s.stop, ke), cuts)]
        blocks, remote, first, then = [], [], [], []
        for p, (blk, ks, ke) in zip(ranges, calls):
            blocks.append(Block(blk.q, slice(ks - lo, ke - lo), causal, blk.cu, blk.cu_k))
            remote.append(any(s.owner != r and s.start < ke and ks < s.stop for s in seen))
            x = _own_suffix(p.start, pieces[r])
            if not remote[-1]:
                first.append(blocks[-1])
            elif causal and x > ks:  # the own rows' part while the others' arrive, theirs merged after
                own, theirs = _split(p, bounds, x)
                first.append(_shifted(own, lo))
                then.append((_shifted(theirs, lo), True))
            else:
                then.append((blocks[-1], False))
        plans.append(RankPlan(lo, hi, blocks, remote, first, then, [s for s in seen if s.owner == r],
                              [s for s in seen if s.owner != r], pieces[r]))
    for r, me in enumerate(plans):
        me.theirs = [(peer, s) for peer, plan in enumerate(plans) if peer != r for s in plan.recv if s.owner == r]
    return plans


def _ranges(pieces):
    """Pieces that continue each other (rows and storage both) joined: one call for the range."""
    out = []
    for p in pieces:
        prev = out[-1] if out else None
        if prev is not None and prev.stop == p.start and prev.local + prev.stop - prev.start == p.local:
            out[-1] = Segment(prev.owner, prev.start, p.stop, prev.local)
        else:
            out.append(p)
    return out


def _own_suffix(a, pieces):
    """Where the rank's own rows that end at row `a` begin (its pieces run back from `a` unbroken)."""
    ends = {p.stop: p.start for p in pieces}
    while a in ends:
        a = ends[a]
    return a


def _split(piece: Segment, bounds, x) -> tuple[tuple[Block, int], tuple[Block, int]]:
    """A causal range call cut at key row x (<= the range's start, the own rows from x on): per
    document, (its queries against its keys from x on, causal; those of the documents that begin
    before x against their keys before x, every pair), each as (block with keys from 0, first key)."""
    a, b = piece.start, piece.stop
    first = bisect.bisect_right(bounds, a) - 1
    docs = [(ds, de) for ds, de in zip(bounds[first:-1], bounds[first + 1:]) if ds < b and ds < de]
    own_q, own_k, far_q, far_k = [0], [0], [0], [0]
    for ds, de in docs:
        nq = min(b, de) - max(a, ds)
        own_q.append(own_q[-1] + nq)
        own_k.append(own_k[-1] + min(b, de) - max(ds, x))
        if ds < x:
            far_q.append(far_q[-1] + nq)
            far_k.append(far_k[-1] + min(de, x) - ds)
    ks = max(docs[0][0], x)
    own = Block(slice(piece.local, piece.local + b - a), slice(0, b - ks), True, tuple(own_q), tuple(own_k))
    far = Block(slice(piece.local, piece.local + far_q[-1]), slice(0, far_k[-1]), False, tuple(far_q), tuple(far_k))
    return (own, ks), (far, docs[0][0])


def _shifted(part, lo) -> Block:
    blk, ks = part
    return Block(blk.q, slice(ks - lo, ks - lo + blk.k.stop), blk.causal, blk.cu, blk.cu_k)


def _cut(a, b, cuts):
    """[a, b) cut at the points `cuts` (sorted) inside it; nothing when empty."""
    if a >= b:
        return []
    inner = cuts[bisect.bisect_right(cuts, a):bisect.bisect_left(cuts, b)]
    points = [a, *inner, b]
    return list(zip(points[:-1], points[1:]))


def _call(piece: Segment, bounds, causal) -> tuple[Block, int, int]:
    """The one call of a query range: (block, first key row, key end) in packed-row rows. Per
    document it overlaps, its queries in the range against the document's keys up to the range's
    end (causal) or to the document's end; the documents' key parts are adjacent rows."""
    a, b = piece.start, piece.stop
    first = bisect.bisect_right(bounds, a) - 1
    cu_q, cu_k = [0], [0]
    ks = ke = bounds[first]
    for ds, de in zip(bounds[first:-1], bounds[first + 1:]):
        if ds >= b:
            break
        if ds == de:
            continue
        ke = min(b, de) if causal else de
        cu_q.append(cu_q[-1] + min(b, de) - max(a, ds))
        cu_k.append(cu_k[-1] + ke - ds)
    q = slice(piece.local, piece.local + b - a)
    return Block(q, slice(0, ke - ks), causal, tuple(cu_q), tuple(cu_k)), ks, ke


def _union(spans):
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def allgather_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="zigzag"):
    world, rank = group_size_rank(group)
    B, s_local = q.shape[:2]
    seq_len = s_local * world
    if layout in DOC_LAYOUTS:
        if world > 1:
            raise ValueError(f"layout {layout} cuts by documents: run it with parallel.softmax_sp=ring, or use "
                             "layout zigzag or contiguous with allgather")
        layout = "contiguous"
    if cu_seqlens is None:  # equal-length rows are documents of one packed row
        bounds = tuple(range(0, B * seq_len + 1, seq_len))
    elif B != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got q of shape {tuple(q.shape)}")
    else:
        bounds = host_bounds(cu_seqlens)
    plan = gather_plan(B * seq_len, seq_len, world, layout, bounds, bool(causal))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _GatherAttention.apply(q, k, v, group, plan, scale)


def _packed(t):
    return t.contiguous().reshape(1, t.shape[0] * t.shape[1], *t.shape[2:])


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, plans, scale):
        rank = group_size_rank(group)[1]
        me = plans[rank]
        q1, k1, v1 = (_packed(t) for t in (q, k, v))
        kb, vb = (t.new_empty((1, me.hi - me.lo) + t.shape[2:]) for t in (k1, v1))
        # K and V: ours to the ranks that see them, theirs into the buffer, one batch
        sends = [(peer, [t[:, _local(s)] for t in (k1, v1)]) for peer, s in me.theirs]
        recvs = [(s.owner, [t[:, s.start - me.lo:s.stop - me.lo] for t in (kb, vb)]) for s in me.recv]
        pending = _exchange(group, sends, recvs)
        for s in me.own:
            for buf, t in ((kb, k1), (vb, v1)):
                buf[:, s.start - me.lo:s.stop - me.lo].copy_(t[:, _local(s)])
        out = q1.new_empty(q1.shape[:-1] + v1.shape[-1:])
        lse = torch.empty((1, q1.shape[2], q1.shape[1]), dtype=_acc_dtype(q1.dtype), device=q1.device)
        bounds = me.bounds(q1.device)

        def attend(blk, merge=False):
            args = (q1[:, blk.q], kb[:, blk.k], vb[:, blk.k])
            if merge:  # into the rows' own part, in place (inside the kernel where it is Triton's)
                flash_attn_merge_(*args, out[:, blk.q], lse[:, :, blk.q], causal=blk.causal, softmax_scale=scale,
                                  **bounds(blk))
                return
            _, l = flash_attn(*args, causal=blk.causal, softmax_scale=scale, return_lse=True, out=out[:, blk.q],
                              **bounds(blk))
            lse[:, :, blk.q] = l

        for blk in me.fwd_first:  # while the rows of the other ranks arrive
            attend(blk)
        pending.wait()
        for blk, merge in me.fwd_then:
            attend(blk, merge)
        ctx.save_for_backward(q1, kb, vb, out, lse)
        ctx.group, ctx.plans, ctx.scale, ctx.shapes = group, plans, scale, (q.shape, k.shape, v.shape)
        return out.reshape(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        q1, kb, vb, out, lse = ctx.saved_tensors
        rank = group_size_rank(ctx.group)[1]
        me = ctx.plans[rank]
        dout1 = _packed(dout)
        dq = torch.empty_like(q1)
        bounds = me.bounds(q1.device)
        grads = []  # (first packed row, dK, dV) of each call

        def grad(blk):
            _, dk_b, dv_b = flash_attn_backward(dout1[:, blk.q], q1[:, blk.q], kb[:, blk.k], vb[:, blk.k],
                                                out[:, blk.q], lse[:, :, blk.q], causal=blk.causal,
                                                softmax_scale=ctx.scale, dq=dq[:, blk.q], **bounds(blk))
            grads.append((me.lo + blk.k.start, dk_b, dv_b))

        order = me.backward_order()
        n_remote = sum(me.remote)
        for blk in order[:n_remote]:  # first: their other ranks' rows go home while the rest computes
            grad(blk)
        sends = [(s.owner, [_summed(_parts(grads, s.start, s.stop, i)) for i in (1, 2)]) for s in me.recv]
        theirs = me.theirs
        recvs = [(peer, [t.new_empty((1, s.stop - s.start) + t.shape[2:]) for t in (kb, vb)]) for peer, s in theirs]
        pending = _exchange(ctx.group, sends, recvs)
        for blk in order[n_remote:]:
            grad(blk)
        pending.wait()
        for (_, s), (_, (dk_p, dv_p)) in zip(theirs, recvs):
            grads.append((s.start, dk_p, dv_p))
        q_shape, k_shape, v_shape = ctx.shapes
        dk, dv = kb.new_empty(k_shape), vb.new_empty(v_shape)
        dk1, dv1 = _packed(dk), _packed(dv)  # views
        for piece in me.pieces:
            cuts = sorted({piece.start, piece.stop, *(x for a, g, _ in grads for x in (a, a + g.shape[1])
                                                      if piece.start < x < piece.stop)})
            for a, b in zip(cuts[:-1], cuts[1:]):
                rows = slice(piece.local + a - piece.start, piece.local + b - piece.start)
                for i, final in ((1, dk1), (2, dv1)):
                    _sum_into(final[:, rows], _parts(grads, a, b, i))
        return dq.reshape(q_shape), dk, dv, None, None, None


def _local(s: Segment) -> slice:
    return slice(s.local, s.local + s.stop - s.start)


def _parts(grads, a, b, i):
    """The views of rows [a, b) of every result (first row, dK, dV) that covers them: dK (i = 1) or dV."""
    return [g[i][:, a - g[0]:b - g[0]] for g in grads if g[0] <= a and b <= g[0] + g[i].shape[1]]


def _summed(parts):
    if len(parts) == 1:
        return parts[0].contiguous()
    total = parts[0].new_empty(parts[0].shape)
    _sum_into(total, parts)
    return total


def _sum_into(final, parts):
    """final = the sum of `parts` taken in fp32 (or wider), rounded once."""
    if parts:
        block_sum_(final, parts)
    else:
        final.zero_()


def _exchange(group, sends, recvs) -> Pending:
    """Post every (peer, tensors) send and receive as one batch of point-to-point transfers; between
    two ranks the order of both lists is the receiver's plan order, so the pairs match."""
    to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
    ops = [dist.P2POp(dist.isend, t, to_global(peer), group) for peer, ts in sends for t in ts]
    ops += [dist.P2POp(dist.irecv, t, to_global(peer), group) for peer, ts in recvs for t in ts]
    return Pending(dist.batch_isend_irecv(ops) if ops else [], (), sends)
