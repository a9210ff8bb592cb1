"""Planner of core-attention disaggregation (DistCA, arXiv 2510.18121): which server computes the
attention of which query range.

A task is the queries [q_start, q_end) of one document with the keys of that document up to
q_end (causal; the whole document when not causal), kv_start = the document start. Only the
query side is cut, so each query's whole softmax is computed by one server: no LSE merge.

The plan starts from "every rank serves the queries it holds" (its shard cut at document
boundaries) and greedily moves work from the most to the least loaded server until every server
is within `eps` of the mean or no move helps. Candidate moves are a whole task, a head or a tail
piece sized to the gap, and (causal) a mirrored head+tail pair: query positions p and L-1-p of a
range together cost a constant, so a pair's cost is linear in its size and hits the gap to one
row. Among the moves that do at least half the good of the best one, the planner takes the one
that moves the most work per byte sent (queries out and outputs back, plus key/value rows the
receiving server does not hold or receive already).

On CUDA a server's call hands long tasks to cuDNN and the rest to seqpar's Triton kernel
(kernels/flash_attn/split_tasks.py), whose backward computes a score pair ~1.5-1.9x slower: with a
`KernelSpeed` the planner weighs each task's pairs by the kernel that will run it, so that a rank
whose documents exceed cuDNN's length cap is not handed the mean number of pairs (2 H100, llama_1b,
64k tokens per GPU: such a step ran 2.9 s of attention on one rank against 2.1 s on the other).

It is pure Python and deterministic: every rank computes the same plan from the same
boundaries, so no communication is needed to agree on it.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from seqpar.kernels.flash_attn.split import cudnn_head, cudnn_tail, runs_on_cudnn
from seqpar.parallel.sharding import local_ranges

# Default per-task cost on top of the score pairs, in score pairs: launch and tile inefficiency of
# one more varlen segment. A GPU cost table (`fit_task_overhead`) replaces it with a measured
# value. It stops the planner from shredding documents for negligible gains.
TASK_OVERHEAD = 128 * 128 // 2
# A score pair on seqpar's Triton kernel, in pairs on cuDNN, for disagg servers' calls: the backward's
# ratio. 2 H100, llama_1b (32/8 heads, D = 64), a 64k-per-GPU step whose long document's tasks ran
# on Triton on one rank (docs/benchmarks/2026-11-26-2gpu-9th/call7): forward 1.06, backward 1.74,
# both 1.55. Every layer waits for its slowest server in each direction, and the backward is 2.6-4x
# the forward: balancing the backward costs the forward less than it saves (per step, per pair:
# 1.74 gives 1197, 1.55 gives 1247, 1.0 gives 1460 in those units). Measured end to end (2 H100, 64k,
# docs/benchmarks/2026-11-27-2gpu-12th): 1.05 ran 1.079x the balanced ideal against 1.7's 1.053x, its
# steps' ratios following the backward's imbalance as 1.7's follow the forward's. A timeline of the
# heaviest step (2026-11-27-gpu-14th/call2, step 9) measured 1.10 forward and 1.90 backward on the
# servers' own tasks, the ranks then waiting for each other ~8 ms a layer forward and 5-10 backward;
# the dk/dv kernel's 128-key tile at D = 64 (7262efd) has since made that backward ~9% faster, and TMA
# loads (1693e8a) all the Triton kernels another 4-10%. Then 1.55 beat 1.7 end to end in two runs on
# 2 H200 at eps 0.02 (docs/benchmarks/2026-11-27-gpu-15th/call4, call5): 1.038x / 1.044x the balanced
# ideal against 1.047x / 1.048x, the heaviest steps gaining most. On H200 with today's kernels
# (2026-11-28-gpu-28th): the cost table at llama_1b's heads fits backward 1.30 / 1.34 (calls 1, 2;
# forward 0.95 / 1.06), pieces of 4-17k queries over 40-65k keys ran 87-95 ms per billion pairs fwd+bwd
# against 67-76 for long causal squares (call 4), the 64 server calls of 16 e2e steps fit 1.25 with
# ROW_COST (call 3); end to end 1.30 ran 1.039x the balanced ideal, 1.55 1.043x, 1.18 1.045x (call 1,
# one run each: within the runs' spread), and the planner's model, fitted on call 3, gives the steps
# 12 ms less attention excess at 1.3 than at 1.55.
TRITON_COST = 1.3
# ... and in the forward alone (the same run): what a per-direction forward plan weighs a Triton pair
TRITON_FWD_COST = 1.06
# What a query row costs a server beyond its score pairs, in cuDNN pairs: per-row work of both
# directions (loading Q, dO, O; writing O, dQ; the lse and delta) and the diagonal tiles, which make a
# short document dearer per pair than a long one (one H200, llama_1b's heads, fwd+bwd: causal squares
# of 16k / 32k / 48k ran 76 / 71 / 67 ms per billion pairs). Fitted on the server calls of the 16
# steps of llama_1b dp=2 64k/GPU (docs/benchmarks/2026-11-28-gpu-28th/call3, 64 calls, with and
# without pieces over a prefix on cuDNN): pairs alone model a call within 5.2% rms (10.6% at worst),
# with 1250 pairs a row 2.2% (5.6%).
ROW_COST = 1250


@dataclass(frozen=True)
class KernelSpeed:
    """Which tasks a server's call runs on cuDNN (`split.runs_on_cudnn` with these lengths;
    `prefix`: causal pieces over a prefix too (`split_tasks.cudnn_prefix()`); of a causal task past max_len
    keys its head, `split.cudnn_head`, and with `prefix` its tail where cuDNN takes it,
    `split.cudnn_tail`) and the cost of a score pair on the Triton kernel that runs
    the rest, relative to cuDNN (`parallel.disagg.triton_cost`), and of a query row (`ROW_COST`)."""
    min_len: int
    max_len: int | None
    prefix: bool
    triton_cost: float
    row_cost: float = ROW_COST

    def by_kernel(self, queries: int, keys: int, causal: bool) -> tuple[int, int]:
        """(cuDNN pairs, Triton pairs) of a task of `queries` over `keys`."""
        total = pairs(keys - queries, keys, 0) if causal else queries * keys
        if runs_on_cudnn(queries, keys, self.min_len, self.max_len, causal and self.prefix):
            return total, 0
        head = cudnn_head(queries, keys, self.min_len, self.max_len, self.prefix) if causal else 0
        if cudnn_tail(queries, keys, head, self.min_len, self.max_len, self.prefix):
            return total, 0
        fast = pairs(keys - queries, keys - queries + head, 0) if head else 0
        return fast, total - fast

    def cost(self, queries: int, keys: int, causal: bool) -> float:
        """The score pairs of a task of `queries` over `keys`, weighed by the kernels that run them,
        and its query rows."""
        fast, slow = self.by_kernel(queries, keys, causal)
        return fast + self.triton_cost * slow + self.row_cost * queries


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
    loads: list[float]          # modelled cost per server after planning
    initial_loads: list[float]  # ... and before (every rank serving its own tokens)
    bytes_moved: int = 0      # modelled bytes servers receive from other ranks (row_bytes units)

    @property
    def imbalance(self) -> float:
        """max/mean of the modelled cost (1.0 = perfect balance)."""
        return _imbalance(self.loads)

    @property
    def initial_imbalance(self) -> float:
        return _imbalance(self.initial_loads)


def _imbalance(loads) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def pairs(q_start: int, q_end: int, kv_start: int, kv_end: int | None = None) -> int:
    """Score pairs of queries [q_start, q_end) over their keys. Causal (kv_end None): keys
    [kv_start, q_end), q*kv - q*(q-1)/2 with q = q_end - q_start, kv = q_end - kv_start.
    Not causal: every query sees [kv_start, kv_end)."""
    q = q_end - q_start
    if kv_end is not None:
        return q * (kv_end - kv_start)
    kv = q_end - kv_start
    return q * kv - q * (q - 1) // 2


def task_cost(q_start: int, q_end: int, kv_start: int, kv_end: int | None = None, *,
              overhead: int = TASK_OVERHEAD, speed: KernelSpeed | None = None) -> float:
    """The planner's cost of a task: its score pairs, weighed by the kernel that runs it (`speed`,
    None: one kernel), plus the per-task overhead."""
    if speed is None:
        return pairs(q_start, q_end, kv_start, kv_end) + overhead
    return speed.cost(q_end - q_start, (q_end if kv_end is None else kv_end) - kv_start, kv_end is None) + overhead


def plan(cu_seqlens, world_size: int, *, layout: str = "contiguous", eps: float = 0.1, min_chunk: int = 128,
         causal: bool = True, overhead: int = TASK_OVERHEAD, row_bytes: tuple[int, int] = (2, 2),
         speed: KernelSpeed | None = None) -> Plan:
    """Plan of the packed row with document boundaries `cu_seqlens` (GLOBAL, tensor or list)
    over `world_size` servers, the tokens held as `shard_sequence(layout)` cuts them.

    `overhead`: per-task cost in score pairs. `row_bytes`: (bytes per query row: Q sent and O
    returned; bytes per key/value row: K and V sent), used to prefer cheap moves; only their ratio
    matters to the choice. `speed`: the servers' kernels (None: every pair costs the same)."""
    bounds = [int(x) for x in (cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens)]
    owned = [local_ranges(bounds[-1], world_size, r, layout) for r in range(world_size)]
    return plan_owned(bounds, owned, eps=eps, min_chunk=min_chunk, causal=causal, overhead=overhead,
                      row_bytes=row_bytes, speed=speed)


def plan_owned(bounds: list[int], owned: list[list[tuple[int, int]]], *, eps: float = 0.1, min_chunk: int = 128,
               causal: bool = True, overhead: int = TASK_OVERHEAD, row_bytes: tuple[int, int] = (2, 2),
               speed: KernelSpeed | None = None) -> Plan:
    """`plan` for explicit ownership: `owned[r]` are the global token ranges rank r holds."""
    world = len(owned)
    if min_chunk < 1:
        raise ValueError(f"min_chunk={min_chunk} must be >= 1")
    if not eps >= 0:
        raise ValueError(f"eps={eps} must be >= 0")
    if overhead < 0:
        raise ValueError(f"overhead={overhead} must be >= 0")
    doc_end = {bounds[i]: bounds[i + 1] for i in range(len(bounds) - 1)}
    model = _Model(causal, overhead, doc_end, [sorted(r) for r in owned], row_bytes, speed)
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
    loads = [sum(model.cost(*t[:3]) for t in ts) for ts in tasks]
    initial = list(loads)

    for _ in range(4 * (sum(map(len, tasks)) + world) + 16):
        mean = sum(loads) / world
        hi = max(range(world), key=loads.__getitem__)  # lowest index on ties: deterministic
        lo = min(range(world), key=loads.__getitem__)
        if loads[hi] <= (1 + eps) * mean and loads[lo] >= (1 - eps) * mean:
            break
        move = _best_move(model, tasks[hi], tasks[lo], lo, loads[hi], loads[lo], mean, min_chunk)
        if move is None:
            break  # no move from the most to the least loaded server lowers the imbalance
        idx, moved, keep = move
        t = tasks[hi][idx]
        d, owner = t[2], t[3]
        loads[hi] -= model.cost(t[0], t[1], d) - sum(model.cost(a, b, d) for a, b in keep)
        if keep:
            t[0], t[1] = keep[0]
        else:
            del tasks[hi][idx]
        for a, b in moved:
            for u in tasks[lo]:  # a piece next to one lo already serves joins it: one task, one overhead
                if u[2] == d and u[3] == owner and (u[1] == a or u[0] == b) and model.within_one_range(
                        owner, min(u[0], a), max(u[1], b)):
                    loads[lo] -= model.cost(u[0], u[1], d)
                    u[0], u[1] = min(u[0], a), max(u[1], b)
                    loads[lo] += model.cost(u[0], u[1], d)
                    break
            else:
                tasks[lo].append([a, b, d, owner])
                loads[lo] += model.cost(a, b, d)

    out = sorted((Task(s, a, b, d, o) for s, ts in enumerate(tasks) for a, b, d, o in ts),
                 key=lambda t: (t.q_start, t.server))
    return Plan(out, loads, initial, model.plan_bytes(out))


class _Model:
    """The cost and transfer model the planner scores moves with."""

    def __init__(self, causal, overhead, doc_end, owned, row_bytes, speed):
        self.causal, self.overhead, self.doc_end, self.owned, self.speed = causal, overhead, doc_end, owned, speed
        self.q_bytes, self.kv_bytes = (int(x) for x in row_bytes)

    def cost(self, a, b, d):
        return task_cost(a, b, d, None if self.causal else self.doc_end[d], overhead=self.overhead, speed=self.speed)

    def weight(self, a, b, d):
        """What a score pair of task [a, b) costs on average on the kernels that run it."""
        if self.speed is None:
            return 1
        n = pairs(a, b, d, None if self.causal else self.doc_end[d])
        return self.speed.cost(b - a, self.key_end(b, d) - d, self.causal) / n if n else 1

    def key_end(self, b, d):
        return b if self.causal else self.doc_end[d]

    def within_one_range(self, rank, a, b):
        """[a, b) inside one of rank's stored ranges (a task must not straddle two chunks)."""
        return any(x <= a and b <= y for x, y in self.owned[rank])

    def not_held(self, server, a, b):
        """Rows of [a, b) that `server` does not hold."""
        return (b - a) - sum(max(0, min(b, y) - max(a, x)) for x, y in self.owned[server])

    def move_bytes(self, server, have, ranges, d, owner):
        """Bytes `server` must receive (and return) to take over query `ranges` of document d,
        given `have[d]`, the end of the keys of d its tasks already read."""
        q = 0 if owner == server else sum(b - a for a, b in ranges) * self.q_bytes
        e = self.key_end(max(b for _, b in ranges), d)
        start = max(d, have.get(d, d))
        return q + (self.not_held(server, start, e) * self.kv_bytes if e > start else 0)

    def plan_bytes(self, tasks):
        ends, total = {}, 0
        for t in tasks:
            if t.server != t.owner:
                total += (t.q_end - t.q_start) * self.q_bytes
            key = (t.server, t.kv_start)
            ends[key] = max(ends.get(key, 0), self.key_end(t.q_end, t.kv_start))
        for (s, d), e in ends.items():
            total += self.not_held(s, d, e) * self.kv_bytes
        return total


def _best_move(model: _Model, tasks, lo_tasks, lo, load_hi, load_lo, mean, min_chunk):
    """(task index, moved ranges, kept ranges) of the move from the most to the least loaded
    server: among moves that leave both below the current maximum and do at least half the good
    of the best (good = how much closer the two loads get to the mean), the fewest bytes per unit
    of good."""
    want = min(load_hi - mean, mean - load_lo)
    have = {}
    for a, b, d, _ in lo_tasks:
        have[d] = max(have.get(d, d), model.key_end(b, d))
    before = abs(load_hi - mean) + abs(load_lo - mean)
    scored, best_good = [], 0
    costs = [model.cost(qs, qe, d) for qs, qe, d, _ in tasks]
    for idx in sorted(range(len(tasks)), key=lambda i: (-costs[i], i)):
        # a move's good is at most dec + inc <= 2 * (task cost + overhead): once that is below half
        # the best found, no smaller task can be eligible
        if 4 * (costs[idx] + model.overhead) < best_good:
            break
        qs, qe, d, owner = tasks[idx]
        for moved, keep in _candidates(model, qs, qe, d, want / model.weight(qs, qe, d), min_chunk):
            dec = model.cost(qs, qe, d) - sum(model.cost(a, b, d) for a, b in keep)
            new_hi, new_lo = load_hi - dec, load_lo + sum(model.cost(a, b, d) for a, b in moved)
            if max(new_hi, new_lo) >= load_hi:
                continue
            good = before - abs(new_hi - mean) - abs(new_lo - mean)
            if good <= 0:
                continue
            nbytes = model.move_bytes(lo, have, moved, d, owner)
            scored.append((good, nbytes, len(moved) + len(keep), idx, moved, keep))
            best_good = max(best_good, good)
    if not scored:
        return None
    # fewest bytes per good (compared cross-multiplied, so 0 bytes needs no special case), then
    # more good, then fewer tasks, then the task order: deterministic on every rank
    pick = min((s for s in scored if 2 * s[0] >= best_good),
               key=lambda s: (_Ratio(s[1], s[0]), -s[0], s[2], s[3]))
    return pick[3], pick[4], pick[5]


class _Ratio:
    """bytes/good compared without division."""
    __slots__ = ("n", "g")

    def __init__(self, n, g):
        self.n, self.g = n, g

    def __lt__(self, other):
        return self.n * other.g < other.n * self.g

    def __eq__(self, other):
        return self.n * other.g == other.n * self.g


def _candidates(model: _Model, qs, qe, d, want, min_chunk):
    """(moved ranges, kept ranges) of task [qs, qe) of the document starting at d: the whole
    task, and pieces sized so the score pairs moved are close to `want`, every piece >= min_chunk."""
    yield ((qs, qe),), ()
    if qe - qs < 2 * min_chunk:
        return
    lo_m, hi_m = qs + min_chunk, qe - min_chunk
    clamp = lambda m: max(lo_m, min(hi_m, m))
    if model.causal:
        # Tail [m, qe): pairs = S(qe-d) - S(m-d), S(n) = n(n+1)/2; head [qs, m): S(m-d) - S(qs-d).
        cuts = set()
        for target in (_tri(qe - d) - want, _tri(qs - d) + want):
            x = _tri_inv(max(target, 0.0)) + d
            cuts |= {clamp(x), clamp(x + 1)}
    else:  # every query row costs the document length
        n = int(want // (model.doc_end[d] - d))
        cuts = {clamp(qs + n), clamp(qs + n + 1), clamp(qe - n), clamp(qe - n - 1)}
    for m in sorted(cuts):
        yield ((m, qe),), ((qs, m),)
        yield ((qs, m),), ((m, qe),)
    if model.causal and qe - qs >= 3 * min_chunk:
        # mirrored pair [qs, qs+m) + [qe-m, qe): positions p and qs+qe-1-p sum to a constant,
        # so the pair costs m * (qs + qe - 2d + 1) pairs, linear in m
        per_row = qs + qe - 2 * d + 1
        n = int(want // per_row)
        for m in {n, n + 1}:
            if min_chunk <= m and qe - qs - 2 * m >= min_chunk:
                yield ((qs, qs + m), (qe - m, qe)), ((qs + m, qe - m),)


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
