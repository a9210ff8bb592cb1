"""Planner of core-attention disaggregation (DistCA, arXiv 2510.18121): which server computes the
attention of which query range.

A task is the queries [q_start, q_end) of one document with the keys of that document up to
q_end (the causal prefix, kv_start = the document start). Only the query side is cut, so each
query's whole softmax is computed by one server and no LSE merge is needed.

The plan starts from "every rank serves the queries it holds" (its shard cut at document
boundaries) and greedily moves work from the most to the least loaded server, cutting a
document's query range only as much as the move needs, until every server is within `eps` of
the mean or no move helps. It is pure Python and deterministic: every rank computes the same
plan from the same boundaries, so no communication is needed to agree on it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from seqpar.parallel.sharding import local_ranges

# Per-task cost on top of the score pairs, in score pairs: a stand-in for launch and tile
# inefficiency of one more varlen segment (the "fitted per-task overhead term"; a GPU
# profile refines it). It stops the planner from shredding documents for negligible gains.
TASK_OVERHEAD = 128 * 128 // 2


@dataclass(frozen=True)
class Task:
    server: int
    q_start: int
    q_end: int
    kv_start: int
    owner: int  # the rank holding these query tokens (the plan's starting server)


@dataclass(frozen=True)
class Plan:
    tasks: list[Task]
    loads: list[int]          # modelled cost per server after planning
    initial_loads: list[int]  # ... and before (every rank serving its own tokens)

    @property
    def imbalance(self) -> float:
        """max/mean of the modelled cost (1.0 = perfect balance)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean else 1.0


def pairs(q_start: int, q_end: int, kv_start: int) -> int:
    """Causal score pairs of queries [q_start, q_end) over keys [kv_start, q_end):
    q*kv - q*(q-1)/2 with q = q_end - q_start, kv = q_end - kv_start."""
    q, kv = q_end - q_start, q_end - kv_start
    return q * kv - q * (q - 1) // 2


def task_cost(q_start: int, q_end: int, kv_start: int) -> int:
    return pairs(q_start, q_end, kv_start) + TASK_OVERHEAD


def plan(cu_seqlens, world_size: int, *, layout: str = "contiguous", eps: float = 0.1, min_chunk: int = 128) -> Plan:
    """Plan of the packed row with document boundaries `cu_seqlens` (GLOBAL, tensor or list)
    over `world_size` servers, the tokens held as `shard_sequence(layout)` cuts them."""
    bounds = [int(x) for x in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens)]
    owned = [local_ranges(bounds[-1], world_size, r, layout) for r in range(world_size)]
    return plan_owned(bounds, owned, eps=eps, min_chunk=min_chunk)


def plan_owned(bounds: list[int], owned: list[list[tuple[int, int]]], *, eps: float = 0.1,
               min_chunk: int = 128) -> Plan:
    """`plan` for explicit ownership: `owned[r]` are the global token ranges rank r holds."""
    world = len(owned)
    if min_chunk < 1:
        raise ValueError(f"min_chunk={min_chunk} must be >= 1")
    # tasks[s] = list of [q_start, q_end, kv_start, owner]; start: every rank serves its own tokens
    tasks: list[list[list[int]]] = [[] for _ in range(world)]
    for r, ranges in enumerate(owned):
        for a, b in ranges:
            i = bisect.bisect_right(bounds, a) - 1
            while a < b:
                end = min(b, bounds[i + 1])
                if end > a:
                    tasks[r].append([a, end, bounds[i], r])
                a = end
                i += 1
    loads = [sum(task_cost(*t[:3]) for t in ts) for ts in tasks]
    initial = list(loads)

    for _ in range(4 * (sum(map(len, tasks)) + world) + 16):
        mean = sum(loads) / world
        hi = max(range(world), key=loads.__getitem__)  # lowest index on ties: deterministic
        lo = min(range(world), key=loads.__getitem__)
        if loads[hi] <= (1 + eps) * mean and loads[lo] >= (1 - eps) * mean:
            break
        move = _best_move(tasks[hi], loads[hi], loads[lo], mean, min_chunk)
        if move is None:
            break  # no move from the most to the least loaded server lowers the maximum
        idx, a, b = move
        t = tasks[hi][idx]
        d = t[2]
        if (a, b) == (t[0], t[1]):
            del tasks[hi][idx]
            loads[hi] -= task_cost(a, b, d)
        else:  # a head or a tail piece: the rest stays on hi
            if a == t[0]:
                t[0] = b
            else:
                t[1] = a
            loads[hi] -= pairs(a, b, d)
        tasks[lo].append([a, b, d, t[3]])
        loads[lo] += task_cost(a, b, d)

    out = sorted((Task(s, a, b, d, o) for s, ts in enumerate(tasks) for a, b, d, o in ts),
                 key=lambda t: (t.q_start, t.server))
    return Plan(out, loads, initial)


def _best_move(tasks, load_hi, load_lo, mean, min_chunk):
    """(task index, a, b): the query range [a, b) of one of `tasks` whose move from the most to
    the least loaded server takes the work closest to `want` off the most loaded one (bringing
    one of the two to the mean), among moves that leave both below the current maximum."""
    want = min(load_hi - mean, mean - load_lo)
    best, best_key = None, None
    for idx, (qs, qe, d, _) in enumerate(tasks):
        cands = [(qs, qe, task_cost(qs, qe, d))]  # whole task: its overhead moves too
        if qe - qs >= 2 * min_chunk:  # a split leaves both pieces >= min_chunk
            lo_m, hi_m = qs + min_chunk, qe - min_chunk
            # Tail [m, qe): pairs = S(qe-d) - S(m-d), S(n) = n(n+1)/2; head [qs, m): S(m-d) - S(qs-d).
            for target_s in (_tri(qe - d) - want, _tri(qs - d) + want):
                x = _tri_inv(max(target_s, 0.0)) + d
                for m in {max(lo_m, min(hi_m, x)), max(lo_m, min(hi_m, x + 1))}:
                    cands.append((m, qe, pairs(m, qe, d)))
                    cands.append((qs, m, pairs(qs, m, d)))
        for a, b, dec in cands:
            new_hi = load_hi - dec
            new_lo = load_lo + task_cost(a, b, d)
            if max(new_hi, new_lo) >= load_hi:
                continue
            key = (abs(dec - want), (a, b) != (qs, qe))  # prefer no new task on ties
            if best_key is None or key < best_key:
                best, best_key = (idx, a, b), key
    return best


def _tri(n: int) -> int:
    return n * (n + 1) // 2


def _tri_inv(s: float) -> int:
    """Largest n with n(n+1)/2 <= s."""
    n = int((math.isqrt(int(8 * s) + 1) - 1) // 2)
    while _tri(n + 1) <= s:
        n += 1
    while n > 0 and _tri(n) > s:
        n -= 1
    return n
