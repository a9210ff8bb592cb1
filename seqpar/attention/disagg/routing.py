"""From a plan's tasks to one rank's transfers: which local rows go to which server, and how a
server lays out what it receives for its one varlen call. Also the split of the tasks into the
two nano-batches of ping-pong."""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from seqpar.attention.disagg.planner import Task, pairs


@dataclass(frozen=True, eq=False)  # hashed by identity: routes are cached, and so is their device form
class Route:
    """This rank's part of (a nano-batch of) the plan, as (start, length) segments of row indices."""
    rank: int
    q_send: tuple        # local query rows to send, grouped by server in rank order
    q_send_splits: list
    q_recv_splits: list  # query rows this server receives from each owner
    kv_send: tuple       # local key/value rows to send, grouped by server
    kv_send_splits: list
    kv_recv_splits: list
    task_kv: tuple       # rows of the received key/value buffer, per task in order (may repeat)
    cu_q: list           # the server's varlen boundaries over its tasks
    cu_k: list
    collective: bool = True  # False: no rank sends anything to another in this (nano-batch of the) plan

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

    # Queries: owner r sends server s its tasks on s in plan order; the server stores them by owner.
    q_send, q_send_splits = [], [0] * world
    for s in range(world):
        for t in tasks:
            if t.server == s and t.owner == rank:
                for a, b, _, loc in pieces(t.q_start, t.q_end):
                    q_send.append((loc, b - a))
                q_send_splits[s] += t.q_end - t.q_start
    mine = sorted((t for t in tasks if t.server == rank), key=lambda t: t.owner)  # stable: plan order per owner
    q_recv_splits = [sum(t.q_end - t.q_start for t in mine if t.owner == o) for o in range(world)]

    ends_by_server = [{} for _ in range(world)]
    for t in tasks:  # key/value pieces a server needs: per document, one range up to its furthest task
        ends = ends_by_server[t.server]
        ends[t.kv_start] = max(ends.get(t.kv_start, 0), key_end(t))
    needed = [[p for d in sorted(ends) for p in pieces(d, ends[d])] for ends in ends_by_server]

    kv_send, kv_send_splits = [], [0] * world
    for s in range(world):
        for a, b, r, loc in needed[s]:
            if r == rank:
                kv_send.append((loc, b - a))
                kv_send_splits[s] += b - a
    # The server's receive buffer: pieces grouped by owner (rank order), global order inside.
    recv = sorted(needed[rank], key=lambda p: p[2])
    kv_recv_splits = [sum(b - a for a, b, r, _ in recv if r == o) for o in range(world)]
    buf_at, off = [], 0
    for a, b, _, _ in recv:
        buf_at.append((a, b, off))
        off += b - a
    buf_at.sort()
    buf_starts = [x[0] for x in buf_at]
    task_kv, cu_q, cu_k = [], [0], [0]
    for t in mine:
        a, e = t.kv_start, key_end(t)
        i = bisect.bisect_right(buf_starts, a) - 1
        while a < e:
            pa, pb, poff = buf_at[i]
            stop = min(e, pb)
            task_kv.append((poff + a - pa, stop - a))
            a, i = stop, i + 1
        cu_q.append(cu_q[-1] + t.q_end - t.q_start)
        cu_k.append(cu_k[-1] + key_end(t) - t.kv_start)
    collective = (any(t.server != t.owner for t in tasks)
                  or any(r != s for s in range(world) for _, _, r, _ in needed[s]))
    return Route(rank, tuple(_merge(q_send)), q_send_splits, q_recv_splits, tuple(_merge(kv_send)), kv_send_splits,
                 kv_recv_splits, tuple(_merge(task_kv)), cu_q, cu_k, collective)


def nano_batches(tasks: list[Task], world: int, bounds, causal: bool, min_chunk: int, owned) -> list[list[Task]]:
    """The tasks in up to four nano-batches, run in this order: local work L1, remote work R1, R2,
    local work L2. A task is local when its server holds its queries and every key it reads, so
    it needs no transfer. The inputs of R1 and R2 travel while L1 (and R1) compute, their outputs
    while R2 and L2 compute; with no local work this is plain ping-pong over R1/R2, with no remote
    work there is no collective at all. Each pair splits every server's work in about equal
    halves; a task holding more than half of it is first cut in two pieces of equal work (both
    >= min_chunk), so a server with one long document still has something to overlap with."""
    doc_end = {bounds[i]: bounds[i + 1] for i in range(len(bounds) - 1)}
    cost = lambda t: pairs(t.q_start, t.q_end, t.kv_start, None if causal else doc_end[t.kv_start])
    key_end = (lambda t: t.q_end) if causal else (lambda t: doc_end[t.kv_start])
    held = lambda s, a, b: sum(max(0, min(b, y) - max(a, x)) for x, y in owned[s]) == b - a
    local = lambda t: t.server == t.owner and held(t.server, t.kv_start, key_end(t))
    groups: list[list[Task]] = [[], [], [], []]  # L1, R1, R2, L2
    for s in range(world):
        mine = [t for t in tasks if t.server == s]
        for first, second, part in ((0, 3, [t for t in mine if local(t)]), (1, 2, [t for t in mine if not local(t)])):
            a, b = _split_work(part, cost, min_chunk)
            groups[first] += a
            groups[second] += b
    return [sorted(g, key=lambda t: (t.q_start, t.server)) for g in groups if g]


def _split_work(tasks: list[Task], cost, min_chunk) -> tuple[list[Task], list[Task]]:
    total = sum(map(cost, tasks))
    big = max(tasks, key=cost, default=None)
    if big is not None and 2 * cost(big) > total and big.q_end - big.q_start >= 2 * min_chunk:
        tasks = [t for t in tasks if t is not big] + _halve(big, cost, min_chunk)
    halves, load = ([], []), [0, 0]
    for t in sorted(tasks, key=lambda t: (-cost(t), t.q_start)):
        h = 0 if load[0] <= load[1] else 1
        halves[h].append(t)
        load[h] += cost(t)
    return halves


def _halve(t: Task, cost, min_chunk) -> list[Task]:
    """`t` cut at the query position that splits its work most evenly (pieces >= min_chunk)."""
    lo, hi = t.q_start + min_chunk, t.q_end - min_chunk
    piece = lambda a, b: cost(Task(t.server, a, b, t.kv_start, t.owner))
    half = cost(t) / 2
    while lo < hi:  # the head's work grows with the cut: first cut whose head holds half
        m = (lo + hi) // 2
        if piece(t.q_start, m) < half:
            lo = m + 1
        else:
            hi = m
    m = lo
    return [Task(t.server, t.q_start, m, t.kv_start, t.owner), Task(t.server, m, t.q_end, t.kv_start, t.owner)]


def _merge(segs):
    """Adjacent (start, length) segments joined: fewer aranges to build per call."""
    out = []
    for s, n in segs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out
