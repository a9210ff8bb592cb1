"""From a plan's tasks to one rank's transfers, and the split of the tasks into nano-batches.

A rank is the owner of its rows and the server of its tasks. Rows it keeps for its own tasks
never travel and are never copied into a staging buffer: the server reads them in place. Rows that
travel are packed by `Assembly`, a host-compiled list of contiguous row ranges that one
`torch.cat` joins (no per-token index tensors: on 2x H100, 2026-11-26, index_put/index_add/gather
over [tokens, heads, dim] cost 12 ms per layer on a batch whose plan moved nothing, against
0.02 ms of transfers). Per nano-batch and pair of ranks one message carries everything that goes
the same way at the same time (Q with K and V; dQ with dK and dV): a nano-batch costs two
all-to-alls in forward and two in backward, or none when no rank sends anything.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from seqpar.attention.disagg.planner import Task, pairs


@dataclass(frozen=True, eq=False)
class Assembly:
    """Rows of one tensor built from row ranges of source tensors. `sizes[s]` cuts source s into
    pieces (None: unused); `order` lists the output's pieces as (source, piece), source -1
    meaning `piece` rows of zeros; `adds` are (base, extra) pieces: the extra is added into the
    base in place before the join, which is how rows that several sources contribute to are
    summed (only gradient sources, which the caller owns, are ever bases). `whole`: the output
    is that source itself, no copy."""
    rows: int
    sizes: tuple
    order: tuple
    adds: tuple
    whole: int | None

    def parts(self, sources, like) -> list:
        """The output's pieces, in order, after the adds (views where possible)."""
        pieces = [None if sz is None else src.split(sz) for src, sz in zip(sources, self.sizes)]
        for (a, i), (b, j) in self.adds:
            pieces[a][i].add_(pieces[b][j])
        return [pieces[s][i] if s >= 0 else like.new_zeros(i, *like.shape[1:]) for s, i in self.order]

    def __call__(self, sources, like):
        if self.whole is not None:
            return sources[self.whole]
        if not self.rows:
            return like.new_empty(0, *like.shape[1:])
        parts = self.parts(sources, like)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def assembly(contribs, src_lens, rows: int) -> Assembly:
    """Compile `contribs` = (out_start, n, source, source_start): output rows
    [out_start, out_start + n) take source rows [source_start, ...). A source row may feed
    several output rows (forward: a key read by several tasks), and an output row may take
    several source rows, summed (backward: their gradients), if those source rows feed nothing
    else. Output rows nobody feeds are zeros."""
    merged = _merged(contribs)
    cuts = sorted({0, rows} | {d for d, *_ in merged} | {d + n for d, n, *_ in merged})
    subs = {}  # output piece start -> [(source, source_start, n)]
    for d, n, s, ss in merged:
        end, i = d + n, bisect.bisect_left(cuts, d)
        while d < end:  # cut at every other contribution's edges: pieces are summed whole
            e = cuts[i + 1]
            subs.setdefault(d, []).append((s, ss, e - d))
            ss, d, i = ss + e - d, e, i + 1
    src_cuts = [{0, m} for m in src_lens]
    for lst in subs.values():
        for s, ss, n in lst:
            src_cuts[s] |= {ss, ss + n}
    src_cuts = [sorted(c) for c in src_cuts]
    used = {s for lst in subs.values() for s, _, _ in lst}
    sizes = tuple(tuple(b - a for a, b in zip(c, c[1:])) if s in used else None for s, c in enumerate(src_cuts))
    order, adds = [], []
    for a, b in zip(cuts, cuts[1:]):
        lst = subs.get(a)
        if not lst:
            order.append((-1, b - a))
            continue
        spans = [(s, bisect.bisect_left(src_cuts[s], ss), bisect.bisect_left(src_cuts[s], ss + n)) for s, ss, n in lst]
        order += [(spans[0][0], p) for p in range(spans[0][1], spans[0][2])]
        if len(spans) > 1:
            if any(j - i != 1 for _, i, j in spans):
                raise AssertionError("a summed source row also feeds another output row")
            adds += [((spans[0][0], spans[0][1]), (s, i)) for s, i, _ in spans[1:]]
    whole = order[0][0] if (len(order) == 1 and not adds and order[0][0] >= 0
                            and src_lens[order[0][0]] == rows) else None
    return Assembly(rows, sizes, tuple(order), tuple(adds), whole)


@dataclass(frozen=True, eq=False)  # hashed by identity: routes are cached, and so is their device form
class Route:
    """This rank's part of (a nano-batch of) the plan. Row counts per rank (self included, which
    never travels): Q rows this rank sends each server / receives from each owner, and K/V rows
    likewise. Sources of the server's buffers: 0 = this rank's rows, 1 + o = the rows received
    from owner o. The server's query buffer holds its own tasks first (in local row order: with
    nothing received it is the local tensor itself), then each other owner's, in rank order."""
    rank: int
    rows: int              # rows this rank holds
    q_send_splits: list
    q_recv_splits: list
    kv_send_splits: list
    kv_recv_splits: list
    cu_q: list             # the server's varlen boundaries over its tasks
    cu_k: list
    send_q: tuple          # per server: Assembly of the local Q rows it gets (None: nothing, or self)
    send_kv: tuple         # per server: Assembly of the local K/V rows it gets
    srv_q: Assembly        # the server's query buffer
    srv_kv: Assembly       # the server's key/value buffer, task by task (a row read by several tasks repeats)
    back_kv: tuple         # per owner: Assembly of the K/V gradient rows it gets back, from the task buffer
    q_off: tuple           # per owner: first row of its queries in the server's query buffer
    own_q: tuple           # (local row, n, kind, row): kind 0 = server buffer, 1 + s = returned by server s
    own_kv: tuple          # ... the same for key/value gradients (kind 0: rows of the task buffer)
    collective: bool = True  # False: no rank sends anything to another in this (nano-batch of the) plan
    # (local start, rows) when the server's query buffer is that slice of its own rows and nothing
    # else: its outputs and dQ are then rows of the final tensors (`owner_placements`)
    q_direct: tuple | None = None
    kv_direct: tuple | None = None  # the same for the key/value task buffer (each row once, all local)

    def sent_rows(self, q_row: int, kv_row: int) -> int:
        """Bytes this rank sends to other ranks in forward plus backward (Q/dQ out, O/dO back,
        K/V out and dK/dV back: a query row costs q_row both ways together, a key row kv_row)."""
        others = lambda splits: sum(splits) - splits[self.rank]
        return ((others(self.q_send_splits) + others(self.q_recv_splits)) * q_row
                + (others(self.kv_send_splits) + others(self.kv_recv_splits)) * kv_row)


def route(tasks: list[Task], bounds, owned, rank: int, causal: bool) -> Route:
    world = len(owned)
    chunks = []  # (global start, global end, owner, local offset), sorted by start
    for r, ranges in enumerate(owned):
        off = 0
        for a, b in ranges:
            chunks.append((a, b, r, off))
            off += b - a
    chunks.sort()
    starts = [c[0] for c in chunks]
    n_local = sum(b - a for a, b in owned[rank])

    def pieces(a, b):
        """[a, b) split at chunk edges: (global start, global end, owner, local start)."""
        out, i = [], bisect.bisect_right(starts, a) - 1
        while a < b:
            ca, cb, r, off = chunks[i]
            e = min(b, cb)
            out.append((a, e, r, off + a - ca))
            a, i = e, i + 1
        return out

    doc_end = {bounds[i]: bounds[i + 1] for i in range(len(bounds) - 1)}
    key_end = (lambda t: t.q_end) if causal else (lambda t: doc_end[t.kv_start])
    pair = {}  # (owner, server) -> its tasks by query position: both ends derive the same order
    for t in sorted(tasks, key=lambda t: (t.q_start, t.q_end)):
        pair.setdefault((t.owner, t.server), []).append(t)
    q_rows = lambda o, s: [p for t in pair.get((o, s), ()) for p in pieces(t.q_start, t.q_end)]

    ends_by_server = [{} for _ in range(world)]
    for t in tasks:  # key/value pieces a server needs: per document, one range up to its furthest task
        ends = ends_by_server[t.server]
        ends[t.kv_start] = max(ends.get(t.kv_start, 0), key_end(t))
    needed = [[p for d in sorted(ends) for p in pieces(d, ends[d])] for ends in ends_by_server]
    kv_rows = lambda o, s: [p for p in needed[s] if p[2] == o]  # global order: the owner's send order

    size = lambda ps: sum(b - a for a, b, *_ in ps)
    q_send_splits = [size(q_rows(rank, s)) for s in range(world)]
    q_recv_splits = [size(q_rows(o, rank)) for o in range(world)]
    kv_send_splits = [size(kv_rows(rank, s)) for s in range(world)]
    kv_recv_splits = [size(kv_rows(o, rank)) for o in range(world)]

    def packer(ps):  # local rows, in order, into a message
        off, contribs = 0, []
        for a, b, _, loc in ps:
            contribs.append((off, b - a, 0, loc))
            off += b - a
        return assembly(contribs, [n_local], off) if off else None
    send_q = tuple(None if s == rank else packer(q_rows(rank, s)) for s in range(world))
    send_kv = tuple(None if s == rank else packer(kv_rows(rank, s)) for s in range(world))

    # the server's query buffer: its own tasks first, then each other owner's rows as they arrive
    owners = [rank] + [o for o in range(world) if o != rank]
    mine = [t for o in owners for t in pair.get((o, rank), ())]
    q_off, off = [0] * world, 0
    for o in owners:
        q_off[o], off = off, off + q_recv_splits[o]
    # A server that serves only its own rows reads its queries (keys) as ONE slice of them, the
    # rows of other tasks between its tasks' forming documents without keys (queries): its
    # outputs and gradients are then rows of the final tensors (`owner_placements`). Worth it
    # while those rows are at most twice the used ones (the kernels write them too: `_span`).
    local_ranges_of = lambda a, b: [(loc, e - s) for s, e, r, loc in pieces(a, b)] if a < b else []
    q_span = kv_span = None
    if off == q_recv_splits[rank] and mine:
        q_span = _span([local_ranges_of(t.q_start, t.q_end) for t in mine])
    if mine and all(r == rank for _, _, r, _ in needed[rank]):
        kv_span = _span([local_ranges_of(t.kv_start, key_end(t)) for t in mine])
    own_pieces = q_rows(rank, rank)
    q_contribs, pos = [], 0
    for a, b, _, loc in own_pieces:
        q_contribs.append((loc - q_span[0] if q_span else pos, b - a, 0, loc))
        pos += b - a
    q_contribs += [(q_off[o], q_recv_splits[o], 1 + o, 0) for o in owners[1:] if q_recv_splits[o]]
    src_q = [n_local] + [0 if o == rank else q_recv_splits[o] for o in range(world)]
    if q_span:
        off = q_span[1] - q_span[0]
    srv_q = assembly([(0, off, 0, q_span[0])] if q_span else q_contribs, src_q, off)

    # where each needed key row sits: local rows in place, received ones in their owner's section
    at, section = [], [0] * world
    for a, b, r, loc in needed[rank]:
        if r == rank:
            at.append((a, b, 0, loc))
        else:
            at.append((a, b, 1 + r, section[r]))
            section[r] += b - a
    at.sort()
    at_starts = [x[0] for x in at]
    kv_contribs, cu_q, cu_k = [], [0], [0]
    q_at, k_at = (q_span or (0,))[0], (kv_span or (0,))[0]
    for t in mine:
        # the slices' gaps before this task: one document without keys, one without queries
        if q_span:
            qa = local_ranges_of(t.q_start, t.q_end)[0][0]
            if qa > q_at:
                cu_q.append(cu_q[-1] + qa - q_at)
                cu_k.append(cu_k[-1])
            q_at = qa + t.q_end - t.q_start
        if kv_span:
            ka = local_ranges_of(t.kv_start, key_end(t))[0][0]
            if ka > k_at:
                cu_q.append(cu_q[-1])
                cu_k.append(cu_k[-1] + ka - k_at)
            k_at = ka + key_end(t) - t.kv_start
        a, e = t.kv_start, key_end(t)
        i = bisect.bisect_right(at_starts, a) - 1
        while a < e:
            pa, pb, src, poff = at[i]
            stop = min(e, pb)
            kv_contribs.append((cu_k[-1] + (a - t.kv_start), stop - a, src, poff + a - pa))
            a, i = stop, i + 1
        cu_q.append(cu_q[-1] + t.q_end - t.q_start)
        cu_k.append(cu_k[-1] + key_end(t) - t.kv_start)
    src_kv = [n_local] + [0 if o == rank else kv_recv_splits[o] for o in range(world)]
    srv_kv = assembly([(0, cu_k[-1], 0, kv_span[0])] if kv_span else kv_contribs, src_kv, cu_k[-1])
    # gradients of a received key row: summed over the tasks that read it, then sent back once
    back_kv = tuple(None if o == rank or not kv_recv_splits[o] else
                    assembly([(ss, n, 0, d) for d, n, s, ss in kv_contribs if s == 1 + o], [cu_k[-1]],
                             kv_recv_splits[o]) for o in range(world))

    # the owner's rows back from every source: its own tasks' from the server buffer, the rest as returned
    own_q = [(loc, n, 0, pos) for pos, n, src, loc in q_contribs if src == 0]
    own_kv = [(loc, n, 0, pos) for pos, n, src, loc in kv_contribs if src == 0]
    for s in owners[1:]:
        for rows_of, own in ((q_rows, own_q), (kv_rows, own_kv)):
            off = 0
            for a, b, _, loc in rows_of(rank, s):
                own.append((loc, b - a, 1 + s, off))
                off += b - a

    collective = (any(t.server != t.owner for t in tasks)
                  or any(r != s for s in range(world) for _, _, r, _ in needed[s]))
    return Route(rank, n_local, q_send_splits, q_recv_splits, kv_send_splits, kv_recv_splits, cu_q, cu_k, send_q,
                 send_kv, srv_q, srv_kv, back_kv, tuple(q_off), tuple(own_q), tuple(own_kv), collective,
                 (q_span[0], srv_q.rows) if q_span else None, (kv_span[0], cu_k[-1]) if kv_span else None)


def _span(ranges_per_task):
    """(first, end) local rows of one slice holding every task's rows, if each task's rows are
    contiguous, the tasks follow each other in local order without sharing a row, and the gaps
    between them are at most twice the rows used; else None."""
    spans = []
    for ranges in ranges_per_task:
        if not ranges or any(a + n != b for (a, n), (b, _) in zip(ranges, ranges[1:])):
            return None
        spans.append((ranges[0][0], ranges[-1][0] + ranges[-1][1]))
    if any(b > c for (_, b), (c, _) in zip(spans, spans[1:])):
        return None
    used = sum(b - a for a, b in spans)
    first, end = spans[0][0], spans[-1][1]
    # a gap row costs the kernels about half what copying a used row in and out costs
    return (first, end) if end - first <= 3 * used else None


def owner_assemblies(routes) -> tuple[Assembly, Assembly]:
    """The owner's query rows (outputs, dQ) and key/value rows (dK/dV) from every nano-batch.
    Sources: per nano-batch i, (W + 1) * i = this rank's server buffer (queries; the task buffer
    for keys), (W + 1) * i + 1 + s = the rows server s returned."""
    world, rank, n = len(routes[0].q_send_splits), routes[0].rank, routes[0].rows
    q_contribs, kv_contribs, q_lens, kv_lens = [], [], [], []
    for i, r in enumerate(routes):
        base = (world + 1) * i
        q_contribs += [(d, m, base + k, ss) for d, m, k, ss in r.own_q]
        kv_contribs += [(d, m, base + k, ss) for d, m, k, ss in r.own_kv]
        q_lens += [r.cu_q[-1]] + [0 if s == rank else r.q_send_splits[s] for s in range(world)]
        kv_lens += [r.cu_k[-1]] + [0 if s == rank else r.kv_send_splits[s] for s in range(world)]
    return assembly(q_contribs, q_lens, n), assembly(kv_contribs, kv_lens, n)


@dataclass(frozen=True, eq=False)
class Placement:
    """The owner's final tensor (outputs, dQ, dK or dV) filled in place. `direct[i]`: rows
    (start, n, accumulate) that nano-batch i's kernel call writes straight into it (None: its
    rows come from its sources); `ops` = (row, n, source, source row, add) copy or add the other
    sources' rows after every nano-batch ran (sources numbered as in `owner_assemblies`);
    `zeros` = (row, n) ranges that nothing writes."""
    rows: int
    direct: tuple
    ops: tuple
    zeros: tuple

    def finish(self, dest, sources):
        for d, n, s, ss, add in self.ops:
            part, src = dest[d:d + n], sources[s][ss:ss + n]
            part.add_(src) if add else part.copy_(src)
        for d, n in self.zeros:
            dest[d:d + n].zero_()
        return dest


def owner_placements(routes) -> tuple[Placement | None, Placement | None]:
    """Placements of the owner's query rows (outputs, dQ) and key/value rows (dK/dV), or None
    where no nano-batch can write into the final tensor (then `owner_assemblies` joins the pieces),
    or where that join is no copy at all (a plan that moves nothing).

    A nano-batch writes directly when its server buffer is one slice of the local rows
    (`Route.q_direct` / `kv_direct`). Query rows belong to one task each, but the slice's gap
    rows (other tasks' queries) are written too (zeros, overwritten later): such a write may not
    touch rows an earlier one wrote. Key rows may be read in several nano-batches, and a slice's
    gap rows get zero gradients, a true partial sum: a direct write accumulates where an earlier
    one wrote all its rows, overwrites where none did, and otherwise the nano-batch keeps its sources."""
    world = len(routes[0].q_send_splits)
    q_asm, kv_asm = owner_assemblies(routes)
    places = []
    for asm, own, key in ((q_asm, "own_q", "q_direct"), (kv_asm, "own_kv", "kv_direct")):
        if asm.whole is not None or not any(getattr(r, key) for r in routes):
            places.append(None)
            continue
        cover, direct, contribs = [], [], []
        for i, r in enumerate(routes):
            base, span = (world + 1) * i, getattr(r, key)
            acc = None
            if span is not None:
                parts = _split_by_cover(span[0], span[0] + span[1], cover)
                if len(parts) == 1 and (key == "kv_direct" or not parts[0][2]):
                    acc = parts[0][2]
                    if key == "kv_direct":
                        cover = _add_cover(cover, span[0], span[0] + span[1])
                    for d, m, k, _ in getattr(r, own) if key == "q_direct" else ():
                        if k == 0:  # the rows of this server's tasks, not the gaps between them
                            cover = _add_cover(cover, d, d + m)
            direct.append(None if acc is None else (span[0], span[1], acc))
            contribs += [(d, m, base + k, ss) for d, m, k, ss in getattr(r, own) if acc is None or k != 0]
        ops = []
        for d, n, s, ss in _merged(contribs):
            for a, b, covered in _split_by_cover(d, d + n, cover):
                ops.append((a, b - a, s, ss + a - d, covered))
            cover = _add_cover(cover, d, d + n)
        zeros, pos = [], 0
        for a, b in cover + [(routes[0].rows, routes[0].rows)]:
            if a > pos:
                zeros.append((pos, a - pos))
            pos = max(pos, b)
        places.append(Placement(routes[0].rows, tuple(direct), tuple(ops), tuple(zeros)))
    return places[0], places[1]


def _merged(contribs):
    """Contributions joined where one continues another from the same source."""
    out = []
    for d, n, s, ss in sorted(c for c in contribs if c[1] > 0):
        last = out[-1] if out else None
        if last and last[2] == s and last[0] + last[1] == d and last[3] + last[1] == ss:
            out[-1] = (last[0], last[1] + n, s, last[3])
        else:
            out.append((d, n, s, ss))
    return out


def _split_by_cover(a, b, cover):
    """[a, b) cut where the sorted disjoint intervals `cover` begin or end: (start, end, covered)."""
    parts, pos = [], a
    for x, y in cover:
        if y <= pos or x >= b:
            continue
        if x > pos:
            parts.append((pos, x, False))
        parts.append((max(pos, x), min(b, y), True))
        pos = min(b, y)
    if pos < b:
        parts.append((pos, b, False))
    return parts


def _add_cover(cover, a, b):
    out = []
    for x, y in sorted(cover + [(a, b)]):
        if out and x <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], y))
        else:
            out.append((x, y))
    return out


def nano_batches(tasks: list[Task], world: int, bounds, causal: bool, min_chunk: int, owned,
                 schedule: str = "ping_pong") -> list[list[Task]]:
    """The tasks in the nano-batches of an overlapped `schedule`, in the forward's order (the
    backward runs them last to first). A task is local when its server holds its queries and every
    key it reads, so it needs no transfer. `ping_pong`: local work L1, remote work R1, R2, local work
    L2; the inputs of R1 and R2 travel while L1 (and R1) compute, their outputs while R2 and L2
    compute; with no local work this is plain ping-pong over R1/R2. `halves`: L1, R, L2, where the
    local halves alone cover the transfers (no K/V row travels twice, one kernel call fewer per
    server). `local_remote`: L, R, nothing cut: the forward's inputs (Q|K|V) travel while L
    computes and its outputs (O) return exposed; the backward's dO arrives exposed and its dQ|dK|dV,
    the larger message, return while L computes; one kernel call more per server than `single`
    and no task cut for it. With no remote work on any server there is nothing to overlap: one
    nano-batch, no collective, and the server runs on its rows in place.

    Each pair splits every server's work in about equal halves. Local work is cut in query order
    (L1 a prefix of the local rows, L2 the rest, a task cut at the point of equal work if its
    pieces keep >= min_chunk), so each half reads its rows as one slice where the tasks are
    adjacent. Remote work is dealt out largest first, its largest task first halved in equal
    work if it holds more than half, so a server with one long document has something to overlap.

    Halves, not an equal L2 on every server (so that the ranks join R's output all-to-all
    together): tried in 755a3a8, that cut the time NCCL's kernels sat on the owner of a split
    document from 219 to 4 ms, but on the same card type (2 H200, 128k tokens per GPU, 2026-11-26)
    it was no faster on wlbllm (1.080x the ideal vs 1.074x) and slower on prolong (1.092x vs 1.060x):
    the least local work, halved, is too short to cover the output transfer."""
    doc_end = {bounds[i]: bounds[i + 1] for i in range(len(bounds) - 1)}
    cost = lambda t: pairs(t.q_start, t.q_end, t.kv_start, None if causal else doc_end[t.kv_start])
    local = _is_local(bounds, causal, owned)
    order = lambda g: sorted(g, key=lambda t: (t.q_start, t.server))  # noqa: E731
    if all(map(local, tasks)):
        return [order(tasks)] if tasks else []
    if schedule == "local_remote":
        return [order(g) for g in ([t for t in tasks if local(t)], [t for t in tasks if not local(t)]) if g]
    if schedule not in ("halves", "ping_pong"):
        raise ValueError(f"nano_batches: schedule {schedule!r} is not one of halves, ping_pong, local_remote")
    groups: list[list[Task]] = [[], [], [], []]  # L1, R1, R2, L2
    for s in range(world):
        mine = [t for t in tasks if t.server == s]
        remote = _split_work if schedule == "ping_pong" else lambda ts, cost, min_chunk: (ts, [])
        for first, second, split, part in ((0, 3, _split_in_order, [t for t in mine if local(t)]),
                                           (1, 2, remote, [t for t in mine if not local(t)])):
            a, b = split(part, cost, min_chunk)
            groups[first] += a
            groups[second] += b
    return [order(g) for g in groups if g]


def _is_local(bounds, causal, owned):
    """Whether a task's server holds its queries and every key it reads."""
    doc_end = {bounds[i]: bounds[i + 1] for i in range(len(bounds) - 1)}
    key_end = (lambda t: t.q_end) if causal else (lambda t: doc_end[t.kv_start])
    held = lambda s, a, b: sum(max(0, min(b, y) - max(a, x)) for x, y in owned[s]) == b - a
    return lambda t: t.server == t.owner and held(t.server, t.kv_start, key_end(t))


def _split_in_order(tasks: list[Task], cost, min_chunk) -> tuple[list[Task], list[Task]]:
    """A prefix (in query order) holding about half the work, and the rest."""
    tasks = sorted(tasks, key=lambda t: t.q_start)
    half, acc = sum(map(cost, tasks)) / 2, 0
    for i, t in enumerate(tasks):
        if acc + cost(t) < half:
            acc += cost(t)
            continue
        if t.q_end - t.q_start >= 2 * min_chunk:
            head, tail = _cut(t, half - acc, cost, min_chunk)
            return tasks[:i] + [head], [tail] + tasks[i + 1:]
        cut = i + 1 if acc + cost(t) - half <= half - acc else i  # the whole task to the nearer side
        return tasks[:cut], tasks[cut:]
    return tasks, []


def _split_work(tasks: list[Task], cost, min_chunk) -> tuple[list[Task], list[Task]]:
    total = sum(map(cost, tasks))
    big = max(tasks, key=cost, default=None)
    if big is not None and 2 * cost(big) > total and big.q_end - big.q_start >= 2 * min_chunk:
        tasks = [t for t in tasks if t is not big] + list(_cut(big, cost(big) / 2, cost, min_chunk))
    halves, load = ([], []), [0, 0]
    for t in sorted(tasks, key=lambda t: (-cost(t), t.q_start)):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(t)
        load[h] += cost(t)
    return halves


def _cut(t: Task, work, cost, min_chunk) -> tuple[Task, Task]:
    """`t` cut at the first query position whose head holds `work` (pieces >= min_chunk)."""
    lo, hi = t.q_start + min_chunk, t.q_end - min_chunk
    piece = lambda a, b: cost(Task(t.server, a, b, t.kv_start, t.owner))
    while lo < hi:  # the head's work grows with the cut
        m = (lo + hi) // 2
        if piece(t.q_start, m) < work:
            lo = m + 1
        else:
            hi = m
    return Task(t.server, t.q_start, lo, t.kv_start, t.owner), Task(t.server, lo, t.q_end, t.kv_start, t.owner)
