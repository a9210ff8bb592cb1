"""`torchrun --nproc_per_node 2 -m seqpar.bench disagg --out FILE.json`: core-attention
disaggregation against the other ways of placing attention work of packed variable-length
documents, on the same batches.

Every rank's micro-batch is packed separately from a document-length mix (DistCA's wlbllm and
prolong lists, `docs/benchmarks/data/`, and the lognormal mix of the ring benchmark), as data
parallelism would give it. The group's row is their concatenation. Causal attention fwd+bwd,
one layer (bf16, H=32 query heads, 8 key/value heads, D=128 on CUDA), per batch:

- dp_no_rebalance: each rank attends its own micro-batch, no communication; the step waits for
  the slowest (max), and the mean over ranks is the balanced ideal;
- disagg / disagg_no_pingpong / disagg_single / disagg_local_remote: `disagg_attention` (layout
  contiguous: tokens stay where the loader put them) under its four schedules (`schedule`): ping-pong
  nano-batches, local halves around the remote work, one call per server with its transfers exposed
  (the default), and local work then remote work (the backward remote first);
- ring: ring attention over the row re-cut zigzag (plain packing + ring CP);
- per_doc_cp: every document cut into 2N chunks, rank r holding chunks r and 2N-1-r of each
  (WLB-ideal); queries stay, each rank gathers the key/value prefixes its chunks need;
- for disagg, on the first --parts-batches batches: compute_only (the same fwd+bwd call with its
  all-to-alls skipped: every copy and kernel, nothing waited for) and comm_only (the all-to-alls
  that call issued, recorded and replayed alone: same sizes, order and waits), both timed like
  the whole, so exposed_comm = disagg - compute_only; the summary takes them over the batches
  that moved work, with the whole's time over the same batches; and waited (per call, the time
  the compute stream stood still on transfers, CUDA events around each wait, counted after a
  warm-up call), so hidden_fraction = 1 - waited / comm_only: the share of the transfers' own time
  that the compute did not wait for (the issue's "ping-pong hiding"), with each rank's waits per
  phase (`{method}_waited_by_phase`: fwd_in, fwd_out, bwd_in, bwd_out); and
  one more call per parts batch recorded as each rank's timeline (`{method}_timeline`: per rank,
  (mark, ms) when each nano-batch's transfer was ready, its kernel done, each direction ended).

Reported per (mix, tokens per rank): modelled attention imbalance (max/mean) before and after
planning, bytes each method sends (fwd+bwd, summed over ranks), and the methods' times averaged
over the batches. `--profile-cost-table OUT.json` instead times one varlen flash call per task
shape, fwd+bwd and fwd alone, over a (q_len, kv_len) grid and whole squares up to cuDNN's length
cap: the table `parallel.disagg.cost_table` fits the planner's per-task overhead from, with the cost
of a Triton score pair in cuDNN pairs per direction beside it (`fitted_triton_cost`). `--heads`,
`--kv-heads`, `--head-dim` set the shapes (a model's own, e.g. llama_1b's 32 / 8 / 64, for its table).
Without CUDA: a small smoke form on gloo (CI runs it on 2 processes).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gzip
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from seqpar import kernels
from seqpar.attention.disagg import configure, current, fit_task_overhead, fit_triton_cost, runtime, step_metrics
from seqpar.attention.disagg import metrics as disagg_metrics
from seqpar.attention.disagg.options import planner_overhead
from seqpar.attention.disagg.planner import pairs, plan_owned
from seqpar.attention.disagg.routing import route
from seqpar.attention.disagg.runtime import _DisaggAttention, _plan_routes, disagg_attention, kernel_speed
from seqpar.attention.ring import ring_attention
from seqpar.bench.ring import _all_ranks, _max_over_ranks, _sync, _triton_version, lognormal_lengths
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
from seqpar.kernels.flash_attn.split import max_doc_len
from seqpar.parallel.dims import attention_comm_options, init_world
from seqpar.parallel.sharding import shard_sequence

MIX_FILES = ("wlbllm", "prolong")
DATA_DIRS = (Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "data",
             Path(__file__).resolve().parents[3] / "shared" / "data" / "doc_lengths")


def load_mix(name: str) -> list[int]:
    for d in DATA_DIRS:
        for path in (d / f"{name}.json.gz", d / f"{name}.json"):
            if path.is_file():
                with (gzip.open(path, "rt") if path.suffix == ".gz" else open(path)) as f:
                    return [int(x) for x in json.load(f)]
    raise FileNotFoundError(f"document-length mix {name!r}: no {name}.json(.gz) in {[str(d) for d in DATA_DIRS]}")


def draw_bounds(mix: str, lengths, tokens: int, world: int, rng: random.Random, seed: int,
                scale: float = 1.0) -> list[int]:
    """Global boundaries of `world` micro-batches of `tokens` each, packed separately (documents
    drawn from the mix, lengths times `scale`, the last one cut to fit): what data parallelism
    hands each rank."""
    bounds = [0]
    for r in range(world):
        if mix == "lognormal":
            pool = lognormal_lengths(int(tokens / scale), seed=seed * world + r)
        lens, room, i = [], tokens, 0
        while room:
            n = pool[i] if mix == "lognormal" and i < len(pool) else rng.choice(lengths or pool)
            n = min(max(1, round(n * scale)), room)
            lens.append(n)
            room, i = room - n, i + 1
        for n in lens:
            bounds.append(bounds[-1] + n)
    return bounds


def per_doc_zigzag(bounds, world) -> list[list[tuple[int, int]]]:
    """Rank r's ranges under per-document zigzag: each document cut into 2N near-equal chunks,
    rank r holding chunks r and 2N-1-r of every document (empty chunks of short documents dropped)."""
    owned = [[] for _ in range(world)]
    n = 2 * world
    for a, b in zip(bounds, bounds[1:]):
        cuts = [a + (b - a) * i // n for i in range(n + 1)]
        for r in range(world):
            for c in (r, n - 1 - r):
                if cuts[c + 1] > cuts[c]:
                    owned[r].append((cuts[c], cuts[c + 1]))
    return owned


def _fwd_bwd(fn, q, k, v, do):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do)
    return out


def _gather_rows(x, ranges):
    return torch.cat([x[:, a:b] for a, b in ranges], dim=1)


def _route_rows(x_full, owned_r):
    return _gather_rows(x_full, owned_r)[0]


@contextlib.contextmanager
def _collective(fn):
    """`disagg_attention`'s all-to-all swapped for `fn` while inside."""
    previous, runtime.all_to_all = runtime.all_to_all, fn
    try:
        yield
    finally:
        runtime.all_to_all = previous


def _no_transfer(out, x, recv, send, group):
    """The call without its transfers: the received buffers keep what they were allocated with,
    so every copy and kernel runs on the same shapes (other values), and nothing is waited for."""
    return None


class TransferTrace:
    """The collectives of disagg calls as the runtime issued and waited for them (sizes, order,
    and where each wait came), recorded from real calls; `replay` times them alone."""

    def __init__(self):
        self.issued, self.events = [], []  # (out numel, in numel, dtype, recv, send, group); ("issue"|"wait", i)

    def __call__(self, out, x, recv, send, group):
        i = len(self.issued)
        self.issued.append((out.numel(), x.numel(), out.dtype, list(recv), list(send), group))
        self.events.append(("issue", i))
        return _RecordedWork(self.events, i, runtime._all_to_all(out, x, recv, send, group))

    def replay(self, device):
        """A function that issues the same all-to-alls on buffers of the same sizes, and waits for
        each where the runtime did: the transfers of the recorded calls without their compute."""
        bufs = [(torch.empty(o, dtype=dt, device=device), torch.empty(n, dtype=dt, device=device))
                for o, n, dt, *_ in self.issued]

        def run():
            works = {}
            for kind, i in self.events:
                if kind == "issue":
                    recv, send, group = self.issued[i][3:]
                    works[i] = dist.all_to_all_single(bufs[i][0], bufs[i][1], recv, send, group=group, async_op=True)
                else:
                    works.pop(i).wait()
            for w in works.values():  # never waited by the runtime: still part of the transfers
                w.wait()
        return run


class _RecordedWork:
    def __init__(self, events, i, work):
        self.events, self.i, self.work = events, i, work

    def wait(self):
        self.events.append(("wait", self.i))
        return self.work.wait()


def parts_times(fn, inputs, timer, device) -> dict:
    """The call `fn(*inputs)` fwd+bwd timed as the whole is (same timer, max over ranks) without
    its transfers (compute_only: every copy and kernel) and as its transfers alone (comm_only:
    the recorded all-to-alls, same sizes, order and waits)."""
    with _collective(_no_transfer):
        compute = _max_over_ranks(timer({"compute": lambda: _fwd_bwd(fn, *inputs)})["compute"], device)
    trace = TransferTrace()
    with _collective(trace):
        _fwd_bwd(fn, *inputs)
    comm = _max_over_ranks(timer({"comm": trace.replay(device)})["comm"], device) if trace.issued else 0.0
    return {"compute_only_ms": compute, "comm_only_ms": comm, "collectives": len(trace.issued)}


def _gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def hidden_fraction(waited, comm_only):
    """1 - waited / comm_only: 1 when the compute never waited for the transfers, 0 when it waited
    as long as they take alone; None without transfers. Not (compute_only + comm_only - total) /
    comm_only: a difference of two whole-call times a few ms apart over transfers of 1-3 ms, it read
    -11 to +3 on 2 H100 (2026-11-26 fifth and sixth sessions), where the waits give 0.95-0.99."""
    return None if comm_only <= 0 else 1 - waited / comm_only


@functools.lru_cache(maxsize=None)
def _attention_group():
    """The world's ranks on a communicator like training's for disaggregated attention
    (`ParallelDims`: its own, NCCL streams at high priority); the world group where there are no
    such options (gloo)."""
    options = attention_comm_options()
    return None if options is None else dist.new_group(pg_options=options)


def bench_batch(args, bounds, device, timer, world, rank, check=False, parts=False) -> dict:
    S = bounds[-1]
    hq, hkv, d, dt = args.heads, args.kv_heads, args.head_dim, args.dtype
    g = torch.Generator(device=device).manual_seed(len(bounds) * 7919 + S)
    q, do = (torch.randn(1, S, hq, d, device=device, dtype=dt, generator=g) for _ in range(2))
    k, v = (torch.randn(1, S, hkv, d, device=device, dtype=dt, generator=g) for _ in range(2))
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    row = {"n_docs": len(bounds) - 1, "max_doc": max(b - a for a, b in zip(bounds, bounds[1:]))}

    # data parallel, no rebalancing: this rank's own micro-batch, its own boundaries
    lo, hi = rank * (S // world), (rank + 1) * (S // world)
    own = [b - lo for b in bounds if lo <= b <= hi]
    own_cu = torch.tensor(own, dtype=torch.int32, device=device)
    mine = [t[:, lo:hi] for t in (q, k, v, do)]
    contiguous = [shard_sequence(t, layout="contiguous") for t in (q, k, v, do)]
    zz = [shard_sequence(t, layout="zigzag") for t in (q, k, v, do)]
    owned = per_doc_zigzag(bounds, world)
    pd_tasks = plan_owned(list(bounds), owned, eps=float("inf"), min_chunk=1).tasks  # every rank serves its own chunks
    pd_routes = (route(pd_tasks, bounds, owned, rank, True),)
    pd = [_route_rows(t, owned[rank]) for t in (q, k, v, do)]
    group = _attention_group()
    disagg = {name: (lambda *x, sch=sch: disagg_attention(*x, group=group, causal=True, cu_seqlens=cu,
                                                          layout="contiguous", schedule=sch))
              for name, sch in SCHEDULES.items()}
    calls = {"dp_no_rebalance": lambda: _fwd_bwd(lambda *x: kernels.flash_attn(*x, causal=True, cu_seqlens=own_cu),
                                                 *mine),
             **{name: (lambda fn=fn: _fwd_bwd(fn, *contiguous)) for name, fn in disagg.items()},
             "ring": lambda: _fwd_bwd(lambda *x: ring_attention(*x, causal=True, cu_seqlens=cu, layout="zigzag"), *zz),
             "per_doc_cp": lambda: _fwd_bwd(lambda *x: _DisaggAttention.apply(*x, pd_routes, group, True, None, None),
                                            *pd)}
    waited = {name: [] for name in disagg}
    by_phase = {name: {phase: [] for phase in disagg_metrics.PHASES} for name in disagg}

    def after(name):  # compute stood still waiting for transfers, per call (read outside the timed run)
        m = step_metrics()
        if name in waited and m:
            waited[name].append(m["sp/exposed_comm_ms"] / m["sp/disagg_calls"])
            for phase, times in by_phase[name].items():
                times.append(m[f"sp/exposed_{phase}_ms"] / m["sp/disagg_calls"])

    ms = timer(calls, after=after)
    times = _all_ranks(ms["dp_no_rebalance"], device)
    row["dp_no_rebalance_rank_ms"] = [round(t, 3) for t in times]
    row["dp_no_rebalance_ms"] = max(times)
    row["balanced_ideal_ms"] = sum(times) / world

    q_row, kv_row = hq * 2 * d * q.element_size(), hkv * 2 * d * k.element_size()
    opts = current()
    for name, sch in SCHEDULES.items():
        fn = disagg[name]
        row[f"{name}_ms"] = _max_over_ranks(ms[name], device)
        row[f"{name}_waited_ms"] = _max_over_ranks(sorted(waited[name])[len(waited[name]) // 2], device)
        # per rank, the median wait per call in each phase: where a rank stood still, and whether the
        # transfer was slow (every rank waits) or one rank late (the others wait for it)
        row[f"{name}_waited_by_phase"] = _gather_objects(
            {phase: round(sorted(t)[len(t) // 2], 3) for phase, t in by_phase[name].items() if t})
        routes, info = _plan_routes(tuple(bounds), S, world, rank, "contiguous", float(opts.eps), int(opts.min_chunk),
                                    True, planner_overhead(opts), (q_row, kv_row), sch,
                                    kernel_speed(*contiguous[:3], opts))
        row[f"{name}_bytes"] = int(sum(_all_ranks(sum(r.sent_rows(q_row, kv_row) for r in routes), device)))
        if parts and sch != "single":  # the same call without its transfers, and its transfers alone
            for key, value in parts_times(fn, contiguous, timer, device).items():
                row[f"{name}_{key}"] = value
            row[f"{name}_exposed_comm_ms"] = round(row[f"{name}_ms"] - row[f"{name}_compute_only_ms"], 3)
            row[f"{name}_hidden_fraction"] = hidden_fraction(row[f"{name}_waited_ms"], row[f"{name}_comm_only_ms"])
            _sync(device)  # the ranks' marks then share (about) one origin
            with disagg_metrics.timeline(device) as marks:  # where each rank's time went, one more call
                _fwd_bwd(fn, *contiguous)
            row[f"{name}_timeline"] = _gather_objects(marks)
        if sch == "ping_pong":
            row.update(imbalance_before=round(info["imbalance_before"], 4),
                       imbalance_after=round(info["imbalance_after"], 4), tasks=info["tasks"],
                       plan_ms=round(info["plan_ms"], 3), nano_batches=len(routes))
        row[f"{name}_server_calls"] = int(_max_over_ranks(sum(r.cu_q[-1] > 0 for r in routes), device))

    row["ring_ms"] = _max_over_ranks(ms["ring"], device)
    # modelled: each rank's K|V goes round the ring in forward, K|V and dK|dV in backward
    row["ring_bytes"] = 3 * (world - 1) * (S // world) * kv_row * world
    row["per_doc_cp_ms"] = _max_over_ranks(ms["per_doc_cp"], device)
    row["per_doc_cp_bytes"] = int(sum(_all_ranks(pd_routes[0].sent_rows(q_row, kv_row), device)))

    if check:  # the methods compute the same attention (first batch only)
        out_d = _fwd_bwd(lambda *x: disagg_attention(*x, causal=True, cu_seqlens=cu, layout="contiguous"),
                         *contiguous).detach()
        ref = kernels.flash_attn(*mine[:3], causal=True, cu_seqlens=own_cu)
        row["max_abs_diff_disagg_vs_local"] = _max_over_ranks((out_d.float() - ref.float()).abs().max().item(), device)
    return row


# disagg_attention's schedules by the names of the benchmark's keys (kept from before `schedule`)
SCHEDULES = {"disagg": "ping_pong", "disagg_no_pingpong": "halves", "disagg_single": "single",
             "disagg_local_remote": "local_remote"}
PARTS = ("compute_only_ms", "comm_only_ms", "collectives", "exposed_comm_ms", "hidden_fraction", "server_calls")


def summarize(rows) -> dict:
    """Means over the batches; compute/comm alone, and what follows from them, over the batches
    that timed them and moved something (the whole call's time averaged over the same batches)."""
    parted = lambda k: any(k.endswith(p) for p in PARTS)
    wanted = lambda k: ((k.endswith("_ms") and not k.endswith("rank_ms")) or k.startswith("imbalance")
                        or k.endswith("_bytes")) and not parted(k)
    keys = list(dict.fromkeys(k for r in rows for k in r if wanted(k)))
    mean = {k: round(sum(r[k] for r in rows if k in r) / sum(k in r for r in rows), 4) for k in keys}
    ideal = mean["balanced_ideal_ms"]
    for m in (*SCHEDULES, "ring", "per_doc_cp", "dp_no_rebalance"):
        if f"{m}_ms" in mean:
            mean[f"{m}_vs_ideal"] = round(mean[f"{m}_ms"] / ideal, 3)
    mean["pingpong_gain"] = round(mean["disagg_no_pingpong_ms"] / mean["disagg_ms"], 3)
    for m in ("disagg", "disagg_no_pingpong"):
        part = [r for r in rows if r.get(f"{m}_collectives")]
        if not part:
            continue
        avg = lambda k: sum(r[k] for r in part) / len(part)
        total, compute, comm = avg(f"{m}_ms"), avg(f"{m}_compute_only_ms"), avg(f"{m}_comm_only_ms")
        fraction = hidden_fraction(avg(f"{m}_waited_ms"), comm)
        mean.update({f"{m}_parts_batches": len(part), f"{m}_parts_ms": round(total, 4),
                     f"{m}_parts_ideal_ms": round(avg("balanced_ideal_ms"), 4),
                     f"{m}_compute_only_ms": round(compute, 4), f"{m}_comm_only_ms": round(comm, 4),
                     f"{m}_exposed_comm_ms": round(total - compute, 4),
                     f"{m}_compute_only_vs_ideal": round(compute / avg("balanced_ideal_ms"), 3),
                     f"{m}_hidden_fraction": None if fraction is None else round(fraction, 3)})
    return mean


def profile_cost_table(args, device) -> dict:
    """ms of one task (q_len queries, the last of kv_len keys, causal) when `reps` such tasks share
    one varlen flash call, fwd+bwd and fwd alone, over a grid of pieces and of whole squares up to
    cuDNN's length cap, with the score pairs each kernel of the servers' call takes: the planner's
    per-task overhead is fitted from it, and what a Triton pair costs in cuDNN pairs per direction."""
    timer = _timer_local(device, max(args.iters, 5), max(args.warmup, 1))  # a fit wants steadier times than a sweep
    shapes = [(q_len, kv_len) for kv_len in args.grid_kv for q_len in args.grid_q if q_len <= kv_len]
    cap = max_doc_len(args.heads, args.head_dim, torch.tensor([], dtype=args.dtype).element_size())
    shapes += [(n, n) for n in args.grid_square if n <= cap and (n, n) not in shapes]
    entries = []
    for q_len, kv_len in shapes:
        reps = max(1, args.grid_tokens // kv_len)
        g = torch.Generator(device=device).manual_seed(q_len * 31 + kv_len)
        rand = lambda n, h: torch.randn(1, n, h, args.head_dim, device=device, dtype=args.dtype, generator=g)
        q, do = rand(reps * q_len, args.heads), rand(reps * q_len, args.heads)
        k, v = rand(reps * kv_len, args.kv_heads), rand(reps * kv_len, args.kv_heads)
        cu_q = torch.arange(0, reps * q_len + 1, q_len, dtype=torch.int32, device=device)
        cu_k = torch.arange(0, reps * kv_len + 1, kv_len, dtype=torch.int32, device=device)
        fwd = lambda: flash_attn(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)

        def step():
            o, lse = fwd()
            flash_attn_backward(do, q, k, v, o, lse, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        speed = kernel_speed(q, k, v, current())
        cudnn, triton = speed.by_kernel(q_len, kv_len, True) if speed else (0, pairs(kv_len - q_len, kv_len, 0))
        entries.append({"q_len": q_len, "kv_len": kv_len, "reps": reps, "ms": timer(step) / reps,
                        "fwd_ms": timer(fwd) / reps, "cudnn_pairs": cudnn, "triton_pairs": triton})
        print(json.dumps(entries[-1]), flush=True)
    table = {"what": "ms of one causal task (q_len queries = the last of kv_len keys), fwd+bwd (ms) and fwd alone "
                     "(fwd_ms), many per varlen call; the score pairs the servers' call gives each kernel",
             "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "dtype": str(args.dtype),
             "entries": entries, **_env(device)}
    for key, fit in (("fitted_task_overhead_pairs", fit_task_overhead), ("fitted_triton_cost", fit_triton_cost)):
        try:
            table[key] = fit(table)
        except ValueError as e:  # keep the measurements; the planner then uses its defaults
            table[key], table[key.replace("fitted", "fit_error")] = None, str(e)
    return table


def server_kernels(args, device) -> dict:
    """Which kernel a server's call gets (dispatch) with one task and with several, and which the
    data-parallel rows get (a packed row of self-attention: the split where it is on)."""
    from seqpar.kernels.dispatch import flash_attn_choice
    q = torch.empty(1, 256, args.heads, args.head_dim, device=device, dtype=args.dtype)
    k = torch.empty(1, 512, args.kv_heads, args.head_dim, device=device, dtype=args.dtype)
    row = torch.empty(1, 512, args.kv_heads, args.head_dim, device=device, dtype=args.dtype)
    rows = torch.tensor([0, 256, 512], dtype=torch.int32, device=device)
    out = {"dp_rows": flash_attn_choice(torch.empty(1, 512, args.heads, args.head_dim, device=device,
                                                    dtype=args.dtype), row, row, cu_seqlens=rows)[0]}
    for name, (cu_q, cu_k) in (("one_task", ([0, 256], [0, 512])), ("tasks", ([0, 128, 256], [0, 256, 512]))):
        cu = dict(cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                  cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32, device=device))
        out[name] = {"forward": flash_attn_choice(q, k, k, return_lse=True, **cu)[0],
                     "backward": flash_attn_choice(q, k, k, backward=True, **cu)[0]}
    from seqpar.kernels.flash_attn.split_tasks import cudnn_prefix
    out["cudnn_prefix"] = cudnn_prefix()  # split.prefix_parts on (the split's)
    return out


def rounds_timer(device, iters, warmup):
    """Median ms of each call of a {name: call} dict over `iters` rounds that run every call once
    in turn, the ranks in step before each run (CUDA events on the compute stream). Timed one
    method after the other, the first (dp_no_rebalance) ran on GPUs still cool from the previous
    batch's set-up, and disagg came out 0-9% slower than it on batches where it moves nothing,
    which run the same kernel on the same rows (H100, 2026-11-26); in rounds, a drift of clocks
    or temperature over the batch reaches every method alike. `after(name)` runs after each timed
    run, outside it."""
    def run(calls, after=None):
        for call in calls.values():
            for _ in range(warmup):
                call()
        if after:
            after(None)  # what the warm-up runs recorded is not a timed run's
        times = {name: [] for name in calls}
        for _ in range(iters):
            for name, call in calls.items():
                _sync(device)
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call()
                    end.record()
                    torch.cuda.synchronize()
                    times[name].append(start.elapsed_time(end))
                else:
                    t = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - t) * 1e3)
                if after:
                    after(name)
        return {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return run


def _timer_local(device, iters, warmup):
    def run(fn):
        import time
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[len(times) // 2]
    return run


def _env(device) -> dict:
    cuda = device.type == "cuda"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                torch=torch.__version__, triton=_triton_version(), python=platform.python_version(),
                nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None)


def _write(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.bench disagg", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="benchmark JSON")
    p.add_argument("--profile-cost-table", metavar="OUT.json", help="write the GPU cost table instead (one process)")
    p.add_argument("--cost-table", help="plan with the per-task overhead fitted from this table")
    p.add_argument("--mixes", nargs="*", default=["wlbllm", "prolong", "lognormal"])
    p.add_argument("--heads", type=int, help="query heads (default 32 on CUDA)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default 8 on CUDA)")
    p.add_argument("--head-dim", type=int, help="head dim (default 128 on CUDA; llama_1b's is 64)")
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="tokens per rank (default 65536 131072)")
    p.add_argument("--batches", type=int, default=None, help="batches per case (default 16)")
    p.add_argument("--parts-batches", type=int, default=4, help="batches that also time compute and comm alone")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--min-chunk", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=None, help="document lengths times this (default 1; smoke 1/16)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (what CI runs on CPU)")
    args = p.parse_args(argv)
    if not (args.out or args.profile_cost_table):
        p.error("give --out FILE.json (the benchmark) or --profile-cost-table OUT.json")

    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        heads, args.dtype = (32, 8, 128), torch.bfloat16
        tokens, batches, iters, warmup = [65536, 131072], 16, 2, 1
        args.grid_q, args.grid_kv = [128, 256, 512, 1024, 2048, 4096], [1024, 4096, 16384, 65536]
        args.grid_square, args.grid_tokens = [8192, 16384, 32768], 131072
    else:  # smoke form: small shapes through the reference kernels on gloo
        heads, args.dtype = (4, 2, 16), torch.float32
        tokens, batches, iters, warmup = [512], 2, 1, 0
        args.grid_q, args.grid_kv, args.grid_square, args.grid_tokens = [16, 64], [64, 256], [128], 512
    args.heads, args.kv_heads, args.head_dim = (given or default for given, default in
                                                zip((args.heads, args.kv_heads, args.head_dim), heads))
    args.tokens = args.tokens or tokens
    args.scale = args.scale or (1.0 if cuda else 1 / 16)  # the smoke's short rows still hold several documents
    args.batches = args.batches or batches
    args.iters = args.iters or iters
    args.warmup = warmup if args.warmup is None else args.warmup

    if args.profile_cost_table:  # one process, no group needed
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
        if int(os.environ.get("RANK", 0)) == 0:
            _write(args.profile_cost_table, profile_cost_table(args, device))
        if not args.out:
            return 0

    owns_group = not dist.is_initialized()
    device = init_world(cuda) if owns_group else (torch.device("cuda", torch.cuda.current_device()) if cuda
                                                   else torch.device("cpu"))
    previous = configure(eps=args.eps, min_chunk=args.min_chunk,
                         task_overhead=None, cost_table=args.cost_table)
    world, rank = dist.get_world_size(), dist.get_rank()
    timer = rounds_timer(device, args.iters, args.warmup)
    result = dict(benchmark="disagg", world=world, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                  dtype=str(args.dtype), eps=args.eps, min_chunk=args.min_chunk, length_scale=args.scale,
                  task_overhead_pairs=planner_overhead(current()), cost_table=args.cost_table,
                  timing="median of --iters fwd+bwd per batch, max over ranks; summary = mean over batches",
                  server_kernels=server_kernels(args, device), cases=[], **_env(device))
    try:
        for mix in args.mixes:
            lengths = None if mix == "lognormal" else load_mix(mix)
            for tokens in args.tokens:
                rng = random.Random(args.seed * 1000003 + tokens)
                rows = []
                for b in range(args.batches):
                    bounds = draw_bounds(mix, lengths, tokens, world, rng, seed=args.seed * 1000 + b, scale=args.scale)
                    rows.append(bench_batch(args, bounds, device, timer, world, rank, check=b == 0,
                                            parts=b < args.parts_batches))
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                case = dict(mix=mix, tokens_per_rank=tokens, batches=len(rows), summary=summarize(rows), rows=rows)
                result["cases"].append(case)
                if rank == 0:
                    print(json.dumps(dict(mix=mix, tokens_per_rank=tokens, **case["summary"])), flush=True)
                    _write(args.out, result)  # a run cut short keeps the cases it finished
    finally:
        configure(previous)
        if owns_group:
            dist.destroy_process_group()
    return 0
