"""Time of one attention layer (forward + backward) on the busiest rank of its sequence-parallel group,
for each method seqpar implements, with the method's communication and overlap rules.

Per method, what the code in seqpar/attention/ issues per layer (forward + backward):

- ring: N steps; each step's blocks come from the planner the kernel runs (`ring.ring_schedule`
  for zigzag/contiguous, `doc_ring_schedule` for doc_zigzag, `doc_balanced_schedule` for
  doc_balanced: whole documents in step 0's call, only the cut documents' rows travel, a single
  step and no transfer when nothing is cut). 3 transfers per remote step (K/V forward, K/V and
  dK/dV backward), each behind the compute the code posts it before (`ring_schedule_time`).
  Every rank waits for its neighbour each step, so a step lasts as long as its busiest rank's.
- ulysses: 4 all-to-alls forward (q, k, v, out) and 4 backward, not overlapped; the kernel sees
  the whole sequence for H/N heads.
- usp: Ulysses over `ulysses_degree` ranks inside a node, then the ring across them.
- allgather: each local query range attends the keys up to its end in one call; before bb52ff6
  K/V all-gathered forward and dK/dV reduce-scattered backward, exposed; from it only the rows a
  rank sees move, behind its local-only calls where it has any (`allgather_layer`).
- disagg: the planner's tasks (`attention.disagg.plan`) on their servers; the busiest server's
  tasks are one varlen call; three all-to-alls forward (queries, K/V once per server, outputs)
  and three backward (dO, dQ, dK/dV), sized by the tokens that leave their owner.
  `parallel.disagg.schedule` (`default_schedule` by era where a config does not say): `single`
  (eras 0-1, and the default again from 219ea22) one nano-batch with the transfers exposed (the
  03:06 run's local-then-remote order, e3ee969, is modelled so too); `halves` (the default from
  c8d5eb5/e23bcd3 to 219ea22) the runtime's L1, R, L2 (`routing.nano_batches`) through the
  ping-pong schedule below, so the remote outputs and gradients return while L2 computes;
  `local_remote` L, R (the backward R, L) likewise; `ping_pong` the runtime's own schedule (`_ping_pong_layer`):
  up to four nano-batches, one kernel call each, remote K/V rows sent once per nano-batch, inputs
  issued up front and outputs as each nano-batch ends on one NCCL stream, and the SM-sharing tax
  on a rank's compute while its issued output waits for the server; a one-task call is torch's
  flash (dense_lse) before c8d5eb5's era and Triton from it, several tasks Triton (packed_lse).
- runtime extras (fitted, `runtime_extra`, `ring_pieces`, `ring_fold_rows`): the disagg runtime's
  and per-document CP's work beyond kernels and transfers per local token; the packed ring's per
  document piece of its calls and per row its blocks fold their results into, and a share of the compute of packed GQA rows. The ring's dense GQA blocks run on
  flash: its lse path takes cuDNN only when query and K/V heads match (kernels/dispatch.py).
- lasp2 (linear layers): the lightning kernel on the local tokens, LASP-2's extra passes (state,
  readout: fitted), one all-gather of the fp32 H x Dk x Dv states forward and one backward;
  seqpar runs the serial schedule, so the gathers are exposed. lasp1: a chain of N-1 sends.
"""
from __future__ import annotations

import functools
from dataclasses import replace

from seqpar.sim.comm import collective_time, overlapped, placed
from seqpar.sim.compute import ATTN_FWD_BWD, REF_HD, AttnCall, attn_features, linear_attn_time


def bounded_one_on_triton(calib) -> bool:
    """Whether a one-document call given with bounds and taking the lse (a one-task disagg server,
    a ring block with cu_seqlens over one document) runs seqpar's Triton kernel: from c8d5eb5 on
    (kernels/dispatch.py `_wants_triton`), where the dispatcher chooses (`calib.packed_kernel`
    "triton"; the ring bench forces torch's kernels). Before, torch's FA2 varlen (`_lse_backend`)."""
    from seqpar.sim.eras import era_since

    return calib.packed_kernel == "triton" and calib.era >= era_since("c8d5eb5")


def split_min_len(calib, heads: int | None = None) -> int:
    """The fewest tokens of a document (a task: its queries) that the split sends to cuDNN, in both
    forms: `split.min_doc_len` (the code's own rule, SEQPAR_CUDNN_DOC_MIN where set), from 790f716
    on of the call's query heads (MIN_DOC_HEAD_TOKENS / heads with a floor of MIN_DOC_LEN: 4096 from
    16 heads on, 8192 at 8, 16384 at 4, a tensor-parallel rank's share of Llama-8B's 32 at tp=8),
    before it 4096 for any heads. `heads` None: the floor. 7a02c2d's per-call rule (era 12: no split
    below 8 query heads) is not modelled: no run of that era has a split call of fewer than 8."""
    from seqpar.kernels.flash_attn.split import min_doc_len
    from seqpar.sim.eras import era_since

    return min_doc_len(heads if calib.era >= era_since("790f716") else None)


def split_applies(calib, call) -> bool:
    """Whether a call runs through the split (kernels/flash_attn/split.py): from 235a598 on, where the
    dispatcher chooses (`calib.packed_kernel` "triton"), a packed self-attention row without lse; from
    b77bec6 to 8969915 with equal query and K/V head counts only. Which of its documents go to cuDNN:
    `split_min_len` (from 790f716 of the call's query heads)."""
    from seqpar.sim.eras import era_since

    gqa_off = call.gqa and era_since("b77bec6") <= calib.era < era_since("8969915")
    return (call.splittable and call.is_varlen and calib.packed_kernel == "triton"
            and calib.era >= era_since("235a598") and not gqa_off)


def lse_split_applies(calib, call) -> bool:
    """Whether a call given with bounds and taking the lse (a ring block with cu_seqlens, a disagg or
    per-document CP server's call) runs the split's lse form (split_tasks.split_forward / split_backward):
    from cec5aa8 on, where the dispatcher chooses (`calib.packed_kernel` "triton"; the ring bench
    forces torch's kernels); or where a run records it (`calib.lse_split`: the disagg bench's
    `server_kernels`, e.g. a run with SEQPAR_ATTN_KERNEL=split before cec5aa8)."""
    from seqpar.sim.eras import era_since

    if not call.with_bounds or calib.packed_kernel != "triton":
        return False
    if calib.lse_split is not None:
        return bool(calib.lse_split)
    return calib.era >= era_since("cec5aa8")


def lse_prefix_applies(calib) -> bool:
    """Whether the split's lse form also sends causal tasks over a longer prefix to cuDNN
    (split.prefix_parts): from 9a4c89d to a63d362 and from ee7b846 on by default, or where a run
    records it (`calib.lse_prefix`: the disagg bench's `server_kernels.cudnn_prefix`, the e2e lane's
    SEQPAR_CUDNN_PREFIX)."""
    from seqpar.sim.eras import era_since

    if calib.lse_prefix is not None:
        return bool(calib.lse_prefix)
    return era_since("9a4c89d") <= calib.era < era_since("a63d362") or calib.era >= era_since("ee7b846")


def split_call_seconds(calib, call, heads: int, head_dim: int, per_octave: int | None = None,
                       tasks: bool = False) -> float:
    """The split's cost: each document of at least the split's minimum (`split_min_len`: from 790f716
    on, of `heads`), and, from 8969915 on, at most
    `max_doc_len`, its cuDNN scratch bound) on cuDNN at its bucket length (the padded rows are
    computed and dropped), the rest as one Triton call (launched even when every document went to
    cuDNN, to store the zeros the cuDNN results overwrite). Its K/V expansion for GQA (a copy per
    long document) is left out: ~1% of the cuDNN call's time at 32k.

    `tasks`: the lse form (`lse_split_applies`): a task is long when its queries and keys are
    equally many (the causal square of a document or its head; a ring block's non-causal square
    runs at its exact length), and from 9a4c89d (`lse_prefix_applies`) also when it is causal with
    more keys than queries, at most max_doc_len keys (a piece over its document's prefix:
    `_prefix_task_seconds`; from 716cea5 any keys, where its causal call fits max_doc_len); the
    others keep their (queries, keys) in the Triton call. From 6eda7f2 on a causal document or task
    past max_doc_len gives cuDNN its head (`split.cudnn_head`) and the Triton call its tail (its
    other queries over all its keys); from 2ad0d6b, with the prefix pieces, cuDNN the tail too where
    it is such a piece (`split.cudnn_tail`)."""
    from seqpar.kernels.flash_attn.split import BUCKETS_PER_OCTAVE, bucket_len, cudnn_head, max_doc_len, runs_on_cudnn
    from seqpar.sim.eras import era_since

    low = split_min_len(calib, heads)
    segs = list(call.segments) if tasks else [(q, q) for q, _ in call.segments]
    top = max_doc_len(heads, head_dim, 2) if calib.era >= era_since("8969915") or tasks else max(q for q, _ in segs)
    prefix = tasks and call.causal and lse_prefix_applies(calib)
    rule, head_of = runs_on_cudnn, cudnn_head
    if prefix and calib.era < era_since("716cea5"):
        rule, head_of = _bucketed_prefix_runs_on_cudnn, _bucketed_prefix_cudnn_head
    is_long = lambda q, k: rule(q, k, low, top, prefix)  # noqa: E731
    triton_tails = set()  # cut segments' tails that stay on Triton although a piece over a prefix (before 2ad0d6b)
    if call.causal and calib.era >= era_since("6eda7f2"):
        cut = []  # each too-long segment as its head (long) and its tail (Triton, or from 2ad0d6b a long piece)
        for q, k in segs:
            head = 0 if is_long(q, k) else head_of(q, k, low, top, prefix)
            cut += [(head, k - q + head), (q - head, k)] if head else [(q, k)]
            if head and calib.era < era_since("2ad0d6b"):
                triton_tails.add(len(cut) - 1)
        segs = cut
    long = [is_long(q, k) and i not in triton_tails for i, (q, k) in enumerate(segs)]
    octave = BUCKETS_PER_OCTAVE if per_octave is None else per_octave
    t = 0.0
    for (q, k), on_cudnn in zip(segs, long):
        if on_cudnn and k > q:
            t += _prefix_task_seconds(calib, q, k, heads, head_dim, octave, low)
        elif on_cudnn:
            n = bucket_len(q, octave) if call.causal else q
            t += _call_seconds(calib, AttnCall.dense(n, n, call.causal), heads, head_dim, "cudnn")
    rest = tuple(seg for seg, on_cudnn in zip(segs, long) if not on_cudnn)
    if rest:  # one Triton call with bounds (of one document or task: the bounded dense case)
        t += _call_seconds(calib, AttnCall(rest, call.causal, True), heads, head_dim, "triton")
    else:
        t += calib.attn["flash"].per_call * calib.triton_packed_ratio
    return t


def _prefix_task_seconds(calib, n: int, m: int, heads: int, head_dim: int, per_octave: int,
                         min_len: int) -> float:
    """A causal task of n queries over m > n keys on cuDNN, where the prefix reaches the split's
    minimum (`min_len`, the task's: `split_min_len`): from 716cea5 (split.prefix_chunks) one
    non-causal call of the n queries (at their bucket) over each min_len keys of the prefix and a
    causal call of f < min_len blank + n real queries (at their bucket) over the last f + n keys;
    before it one non-causal call over the first p prefix keys (a bucket length) and that causal
    call after the rest (`_bucketed_prefix_parts`)."""
    from seqpar.kernels.flash_attn.split import bucket_len, prefix_chunks
    from seqpar.sim.eras import era_since

    chunked = calib.era >= era_since("716cea5")
    p, f = prefix_chunks(n, m, min_len) if chunked else _bucketed_prefix_parts(n, m, min_len, per_octave)
    rows = bucket_len(f + n, per_octave)
    t = _call_seconds(calib, AttnCall.dense(rows, rows, True), heads, head_dim, "cudnn")
    if p:
        calls, keys = (p // min_len, min_len) if chunked else (1, p)
        t += calls * _call_seconds(calib, AttnCall.dense(bucket_len(n, per_octave), keys, False), heads, head_dim,
                                   "cudnn")
    return t


# The lse split's pieces over a prefix before 716cea5: long when their keys fit max_len, the prefix in
# one non-causal call of a bucket length
def _bucketed_prefix_runs_on_cudnn(n: int, m: int, min_len: int, max_len: int | None, causal: bool) -> bool:
    return min_len <= n and (m == n or (causal and m > n)) and (max_len is None or m <= max_len)


def _bucketed_prefix_cudnn_head(n: int, m: int, min_len: int, max_len: int | None, causal: bool) -> int:
    if max_len is None or m < n or m <= max_len:
        return 0
    head = max_len - (m - n)
    return head if 0 < head < n and _bucketed_prefix_runs_on_cudnn(head, m - n + head, min_len, max_len, causal) else 0


def _bucketed_prefix_parts(n: int, m: int, min_len: int, per_octave: int) -> tuple[int, int]:
    """(p, f): the first p prefix keys, the largest bucket length (`split.bucket_len`'s grid) within
    the prefix (0 below min_len), in the non-causal call; f blank rows before the queries in the
    causal call."""
    r = m - n
    if r < min_len:
        return 0, r
    step = max(1, (1 << (r.bit_length() - 1)) // per_octave) if per_octave and r >= per_octave else 1
    p = r // step * step
    return p, r - p


def attn_seconds(calib, calls, heads: int, head_dim: int, family: str = "cudnn") -> float:
    """Dense calls run on `family`'s kernel; varlen (packed) calls on torch's varlen flash, or on
    seqpar's Triton kernel where the dispatcher sends them (`calib.packed_kernel`, the default since
    kernels/dispatch.py's TRITON_FASTER): torch's flash constants times the measured time ratio.
    A one-document call with bounds is torch's flash, or Triton (the dense ratio) from the era of
    c8d5eb5 on (`bounded_one_on_triton`). The split takes packed rows without lse from 235a598 on
    (`split_applies`) and calls with bounds and lse from cec5aa8 on (`lse_split_applies`); from 790f716
    its cuDNN share shrinks with the call's query heads (`split_min_len`: at 4 heads documents under
    16k stay in its Triton call, so a row of only such documents is one Triton call)."""
    total = 0.0
    for call in calls:
        if split_applies(calib, call):
            total += split_call_seconds(calib, call, heads, head_dim)
        elif lse_split_applies(calib, call):
            total += split_call_seconds(calib, call, heads, head_dim, tasks=True)
        else:
            total += _call_seconds(calib, call, heads, head_dim, family)
    return total


def _call_seconds(calib, call, heads: int, head_dim: int, family: str) -> float:
    """One kernel call on the kernel the dispatcher gives it, the split aside."""
    fit_family = "flash" if call.is_varlen or call.with_bounds or family not in calib.attn else family
    fit = calib.attn[fit_family]
    ratio, kernel = 1.0, fit_family
    if call.is_varlen and calib.packed_kernel == "triton":
        ratio, kernel = calib.triton_packed_ratio, "triton"
    elif call.with_bounds and not call.is_varlen and bounded_one_on_triton(calib):
        ratio, kernel = calib.triton_dense_ratio, "triton"
    elif family == "triton":  # a dense call on seqpar's Triton kernel: torch's flash times the measured ratio
        ratio, kernel = calib.triton_dense_ratio, "triton"
    # the kernels lose different shares of their speed at a smaller head dim (measured per kernel
    # where sim_hd64 ran: calib.kernel_head_dim_rate; else the one rate for every kernel)
    rates = {**calib.head_dim_rate, **calib.kernel_head_dim_rate.get(kernel, {})}
    flops, rows, n = attn_features(call, heads, head_dim, rates)
    return (flops / fit.rate + rows * fit.per_token + n * fit.per_call) * ratio


def _clip(bounds, a, b):
    """Document pieces of the rows [a, b): (start, end, document start)."""
    out = []
    for i in range(len(bounds) - 1):
        s, e = max(a, bounds[i]), min(b, bounds[i + 1])
        if s < e:
            out.append((s, e, bounds[i]))
    return out


def block_call(blk, causal=True) -> AttnCall | None:
    if blk.cu_k is not None:  # a rectangle whose key rows' documents differ from the queries' (pad tails)
        pairs = [(b - a, d - c) for a, b, c, d in zip(blk.cu[:-1], blk.cu[1:], blk.cu_k[:-1], blk.cu_k[1:])]
        return AttnCall(tuple((nq, nk) for nq, nk in pairs if nq and nk), blk.causal, True)
    if blk.cu is not None:
        docs = [b - a for a, b in zip(blk.cu[:-1], blk.cu[1:])]
        return AttnCall.varlen(docs, blk.causal, True)
    nq, nk = blk.q.stop - blk.q.start, blk.k.stop - blk.k.start
    return AttnCall.dense(nq, nk, blk.causal)


def runtime_extra(calib, method: str, bounds, heads: int = 32, head_dim: int = 128) -> float:
    """Seconds the disagg runtime (disagg, per-document CP) spends beyond its kernels and transfers,
    per layer (fwd + bwd): gathers of task rows, index building, merges, all scaling with the
    tokens (`calib.runtime_token_s`, fitted on the disagg benchmark at 32 heads x 128). The
    profile of that benchmark (docs/benchmarks/2026-11-26-2xh100-profile/disagg) puts it in
    index_put / index_add / gather / cat kernels over [tokens, heads, head_dim] rows, so it scales
    with the heads a rank holds (fewer under tp)."""
    return calib.runtime_token_s.get(method, 0.0) * bounds[-1] * heads * head_dim / REF_HD


DOC_LAYOUTS = ("doc_zigzag", "doc_balanced")  # seqpar.parallel.sharding's layouts cut by documents


@functools.lru_cache(maxsize=256)
def _ring_plan(bounds: tuple[int, ...], world: int, layout: str):
    """(blocks[r][s]: rank r's kernel blocks at ring step s, rows per rank, K/V rows that travel):
    the plan seqpar.attention.ring runs for this row. doc_zigzag: every document in 2N pieces, every
    row travels; doc_balanced: whole documents stay on their rank, only the cut documents' rows
    travel (`DocBalanced.split_len`), and one step, no transfer, when nothing is cut. At world 1 a
    document layout is the identity (the plain path)."""
    from seqpar.attention.ring import doc_balanced_schedule, doc_ring_schedule, ring_schedule
    from seqpar.parallel.sharding import document_plan, local_ranges

    if layout in DOC_LAYOUTS and world > 1:
        plan = document_plan(layout, list(bounds), world)
        if layout == "doc_balanced":
            return [doc_balanced_schedule(plan, r, True) for r in range(world)], plan.local_len, plan.split_len
        return [doc_ring_schedule(plan, r, True) for r in range(world)], plan.local_len, plan.local_len
    layout = "contiguous" if layout in DOC_LAYOUTS else layout
    seq = bounds[-1]
    held = [local_ranges(seq, world, r, layout) for r in range(world)]
    cu = list(bounds) if len(bounds) > 2 else None
    return [ring_schedule(held, r, cu, True) for r in range(world)], seq // world, seq // world


def ring_rows(bounds: tuple[int, ...], world: int, layout: str = "zigzag") -> tuple[int, int]:
    """(rows each rank holds, K/V rows that go round the ring) under `layout`."""
    _, local, travel = _ring_plan(tuple(bounds), world, layout)
    return local, travel


def ring_pieces(bounds: tuple[int, ...], world: int, layout: str = "zigzag") -> int:
    """Document pieces the busiest rank's ring calls hold, summed over steps: what the packed ring
    pays per piece beyond the kernel (`calib.ring_piece_s`: host work per document bound, fitted on
    the packed ring rows). Dense rows: 0 (their cost is in the kernel constants)."""
    if len(bounds) <= 2:
        return 0
    steps = ring_step_calls(tuple(bounds), world, layout)
    return sum(max(sum(len(c.segments) for c in calls if c) for calls in per_rank) for per_rank in steps)


def ring_fold_rows(bounds: tuple[int, ...], world: int, layout: str = "zigzag") -> int:
    """Rows the busiest rank's ring blocks fold their results into, summed over steps (each block's
    query rows, for out and dq, and key rows, for dK/dV): what the packed ring pays per row beyond
    its kernels (`calib.ring_fold_row_s`, fitted on the packed ring rows). The era-0 ring merged every
    block result into zero-filled fp32 buffers (the 00:47 profile of its packed zigzag ring: ~6 ms of
    add_ / copy_ / fill_ / cat beside 27 ms of kernels at 64k); the fold plans (7a17a3f) removed
    most of it. Dense rows: 0 (their cost is in the kernel constants, fitted on dense ring rows)."""
    if len(bounds) <= 2:
        return 0
    blocks = _ring_plan(tuple(bounds), world, layout)[0]
    return sum(max(sum(b.q.stop - b.q.start + b.k.stop - b.k.start for b in blocks[r][s]) for r in range(world))
               for s in range(len(blocks[0])))


@functools.lru_cache(maxsize=256)
def ring_step_calls(bounds: tuple[int, ...], world: int, layout: str = "zigzag"):
    """calls[s][r]: rank r's kernel calls at ring step s (seqpar.attention.ring's own plan,
    `_ring_plan`; doc_balanced with nothing cut has one step)."""
    blocks = _ring_plan(tuple(bounds), world, layout)[0]
    return [[[block_call(b) for b in blocks[r][s]] for r in range(world)] for s in range(len(blocks[0]))]


def _home_rows(bounds: tuple[int, ...], world: int, layout: str) -> int:
    """K/V rows of the last dK/dV hop home, busiest rank: a ring of 2 sends the block gradients of
    its one remote step as the kernel wrote them (the rows those blocks read, in the inputs'
    dtype), a longer ring the travelling fp32 accumulators."""
    blocks, _, travel = _ring_plan(tuple(bounds), world, layout)
    if world != 2 or len(blocks[0]) != 2:
        return travel
    return max(sum(b.k.stop - b.k.start for b in per_rank[1]) for per_rank in blocks)


def ring_schedule_time(first: float, rest: float, remote: list[float], kv: float, home: float, tax: float,
                       dkv: float | None = None) -> float:
    """Seconds of one ring layer (forward + backward) as seqpar.attention.ring orders its work:
    `first` / `rest` the fwd+bwd seconds of step 0's first block and of its other blocks, `remote[i]`
    those of step i+1, `kv` one K/V shift, `dkv` one dK/dV shift (default `kv`), `home` the last
    dK/dV hop. Forward: each step's compute hides the next step's K/V, posted at its start.
    Backward: the own first block hides the first K/V shift, step s the next K/V shift and step
    s-1's dK/dV, and the own other blocks the hop home. A transfer longer than the compute beside it is exposed; the compute it
    overlaps pays `tax` (SM sharing). So a heavy step 0 (whole documents) hides the transfers
    that a light remote step (a few crossing documents) would expose."""
    f, b = 1 / ATTN_FWD_BWD, 1 - 1 / ATTN_FWD_BWD
    dkv = kv if dkv is None else dkv
    if not remote:
        return first + rest
    hide = lambda work, comm: max(work + tax * min(work, comm), comm)
    steps = [first + rest] + remote
    fwd = sum(hide(f * c, kv) for c in steps[:-1]) + f * steps[-1]
    bwd = hide(b * first, kv)
    for i, c in enumerate(remote):
        in_flight = (kv if i + 1 < len(remote) else 0.0) + (dkv if i >= 1 else 0.0)
        bwd += hide(b * c, in_flight)
    return fwd + bwd + hide(b * rest, home)


def ring_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family="cudnn", act=2,
               layout="zigzag"):
    """(seconds, exposed comm seconds, compute seconds) of ring attention on `rows` (document bounds per row)
    under `layout` (zigzag, contiguous, doc_zigzag, doc_balanced); the packed rows' runtime extra
    (`runtime_extra`) counts as compute. Each step lasts as long as its busiest rank's compute."""
    if world == 1:
        t = sum(attn_seconds(calib, [_single_call(b, kv_heads < heads)], heads, head_dim, family) for b in rows)
        return t, 0.0, t
    if kv_heads < heads:
        family = "flash"  # the ring's lse path runs cuDNN only without GQA (kernels/dispatch.py _lse_backend)
    cost = lambda calls: attn_seconds(calib, [c for c in calls if c], heads, head_dim, family)
    kv_row = 2 * kv_heads * head_dim * act  # one row of K and V
    total = compute_total = 0.0
    for bounds in rows:
        bounds = tuple(bounds)
        steps = ring_step_calls(bounds, world, layout)
        _, travel = ring_rows(bounds, world, layout)
        kv = collective_time("send_recv", travel * kv_row, group, cluster, calib.comm) if len(steps) > 1 else 0.0
        # beyond a ring of 2 the visiting dK/dV travel as fp32 accumulators (ring.py _acc_dtype)
        dkv = collective_time("send_recv", travel * kv_row * 4 / act, group, cluster, calib.comm) \
            if len(steps) > 2 else kv
        home = collective_time("send_recv", _home_rows(bounds, world, layout) * kv_row, group, cluster,
                               calib.comm) if len(steps) == 2 else dkv
        own = [cost(calls) for calls in steps[0]]
        busiest = max(range(world), key=lambda r: own[r])
        first = cost(steps[0][busiest][:1])
        remote = [max(cost(calls) for calls in per_rank) for per_rank in steps[1:]]
        row_compute = own[busiest] + sum(remote)
        total += ring_schedule_time(first, own[busiest] - first, remote, kv, home, calib.overlap_tax, dkv)
        compute_total += row_compute
        extra = calib.ring_piece_s * ring_pieces(bounds, world, layout)
        extra += calib.ring_fold_row_s * ring_fold_rows(bounds, world, layout) * heads * head_dim / REF_HD
        if len(bounds) > 2 and kv_heads < heads:
            # packed GQA rows ran slower than the MHA-fitted kernel constants say (disagg bench only)
            extra += calib.ring_gqa_slowdown * row_compute
        total += extra
        compute_total += extra
    return total, total - compute_total, compute_total


def _single_call(bounds, gqa: bool = False) -> AttnCall:
    """The model's own call over a row (cp = 1): flash_attn with the row's bounds, no lse; `gqa`: fewer
    K/V than query heads."""
    docs = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if len(docs) > 1:
        return replace(AttnCall.varlen(docs), splittable=True, gqa=gqa)
    return AttnCall.dense(docs[0], docs[0], True)


def ulysses_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family="cudnn", act=2):
    compute = sum(attn_seconds(calib, [_single_call(b, max(1, kv_heads // world) < heads // world)], heads // world,
                               head_dim, family) for b in rows)
    comm = 0.0
    for bounds in rows:
        local = bounds[-1] // world
        q_bytes, kv_bytes = local * heads * head_dim * act, local * kv_heads * head_dim * act
        one_way = 2 * collective_time("all_to_all", q_bytes, group, cluster, calib.comm) + \
            2 * collective_time("all_to_all", kv_bytes, group, cluster, calib.comm)
        comm += 2 * one_way  # forward q, k, v, out; backward dout, dq, dk, dv
    return compute + comm, comm, compute


def allgather_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family="cudnn", act=2,
                    layout="zigzag"):
    """All-gather attention: each local query range attends the keys up to its end in one call.
    Before bb52ff6: K/V all-gathered, dK/dV reduce-scattered, exposed; calls without bounds (SDPA where
    queries and keys match, the Triton kernel where SDPA's top-left causal mask would be wrong). From
    bb52ff6 on (`attention.allgather.gather_plan`): every call with bounds and an lse, only the rows a
    rank sees move (point to point), the forward's transfer behind the calls on own rows (the
    local-only ones and, from the split, the own rows' part of the others), the backward's dK/dV
    behind the local-only calls."""
    from seqpar.parallel.sharding import local_ranges
    from seqpar.sim.eras import era_since

    if calib.era >= era_since("bb52ff6"):
        return _gather_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family, act, layout)
    compute = comm = 0.0
    for bounds in rows:
        seq = bounds[-1]
        per_rank = []
        for r in range(world):
            t = 0.0
            for a, b in local_ranges(seq, world, r, layout):
                pieces = _clip(bounds, a, b)
                call = AttnCall(tuple((e - s, e - d) for s, e, d in pieces), True)
                nq, nk = call.segments[0]
                # one document whose queries see more keys than they are: SDPA's causal mask is
                # top-left aligned, so kernels/dispatch.py sends it to the Triton kernel
                fam = "triton" if not call.is_varlen and nq != nk else family
                t += attn_seconds(calib, [call], heads, head_dim, fam)
            per_rank.append(t)
        compute += max(per_rank)
        kv_all = 2 * seq * kv_heads * head_dim * act
        comm += collective_time("all_gather", kv_all, group, cluster, calib.comm) + \
            collective_time("reduce_scatter", kv_all, group, cluster, calib.comm)
    return compute + comm, comm, compute


def _gather_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family, act, layout):
    from seqpar.attention.allgather import gather_plan

    kv_row = 2 * kv_heads * head_dim * act  # one row of K and V (and of dK and dV)
    total = compute_total = 0.0
    for bounds in rows:
        seq = bounds[-1]
        ranks = []
        for me in gather_plan(seq, seq, world, layout, tuple(bounds), True):
            cost = lambda blocks: sum(attn_seconds(calib, [_gather_call(b)], heads, head_dim, family)  # noqa: E731
                                      for b in blocks)
            # a call's forward is 1 / ATTN_FWD_BWD of its time; the forward may run a call as two parts
            first = cost(me.fwd_first) / ATTN_FWD_BWD
            fwd = first + cost(b for b, _ in me.fwd_then) / ATTN_FWD_BWD
            bwd_local = cost(c for c, r in zip(me.calls, me.remote) if not r) * (1 - 1 / ATTN_FWD_BWD)
            bwd = cost(me.calls) * (1 - 1 / ATTN_FWD_BWD)
            moved = collective_time("send_recv", sum(s.stop - s.start for s in me.recv) * kv_row, group, cluster,
                                    calib.comm)
            # the forward's K/V behind the calls on own rows, the backward's dK/dV behind the local-only calls
            ranks.append((fwd + bwd, max(0.0, moved - first) + max(0.0, moved - bwd_local)))
        compute = max(c for c, _ in ranks)
        total += max(c + e for c, e in ranks)
        compute_total += compute
    return total, total - compute_total, compute_total


def _gather_call(blk) -> AttnCall:
    return AttnCall(tuple((q, k) for q, k in zip(_lengths(blk.cu), _lengths(blk.cu_k)) if q > 0), blk.causal,
                    with_bounds=True)


def _lengths(cu):
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def perdoc_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family="cudnn", act=2):
    """Per-document context parallelism (Llama 3's CP, WLB-LLM's baseline): every document cut into
    2N chunks, rank r keeping chunks r and 2N-1-r (balanced causal work), K/V all-gathered forward
    and dK/dV reduce-scattered backward, exposed. Short documents become many small kernel pieces."""
    compute = comm = 0.0
    for bounds in rows:
        per_rank = [[] for _ in range(world)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            n = b - a
            size = max(1, n // (2 * world))
            for r in range(world):
                for c in (r, 2 * world - 1 - r):
                    s, e = c * size, (n if c == 2 * world - 1 else (c + 1) * size)
                    if e > s:
                        per_rank[r].append((e - s, e))
        # the disagg runtime serves the chunks: calls with bounds and an lse (the split's lse form from cec5aa8)
        times = [attn_seconds(calib, [AttnCall(tuple(segs), True, True)], heads, head_dim, family)
                 for segs in per_rank]
        compute += max(times) + runtime_extra(calib, "per_doc_cp", bounds, heads, head_dim) / world
        kv_all = 2 * bounds[-1] * kv_heads * head_dim * act
        comm += collective_time("all_gather", kv_all, group, cluster, calib.comm) + \
            collective_time("reduce_scatter", kv_all, group, cluster, calib.comm)
    return compute + comm, comm, compute


def default_schedule(era: int) -> str:
    """The disagg runtime's schedule without ping-pong or `parallel.disagg.schedule`, as the era's code
    ran it: one nano-batch (eras 0-1), local halves around the remote work (c8d5eb5 / e23bcd3 on; era
    3's equal tails are rebuilt inside `_ping_pong_layer`), one call per server again from 219ea22."""
    from seqpar.sim.eras import era_since

    return "halves" if era_since("c8d5eb5") <= era < era_since("219ea22") else "single"


def disagg_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family="cudnn", act=2,
                 overlap=False, eps=0.1, min_chunk=128, task_overhead=None, schedule=None, triton_cost=None):
    """`schedule` (`parallel.disagg.schedule`): "single" (one nano-batch, the transfers exposed),
    "halves" (L1, R, L2 through `_ping_pong_layer`), "local_remote" (L, R; the backward R, L),
    "ping_pong" (seqpar's ping-pong as its runtime runs it); None: the era's default (`default_schedule`). `overlap`: True is "ping_pong" (the
    option before 219ea22), "distca" DistCA's schedule, every transfer behind the other nano-batch's
    attention (the sweep's comparison with the paper)."""
    from seqpar.attention.disagg.planner import TASK_OVERHEAD

    # the runtime always passes cu_seqlens and takes the lse: a server's call of one task is the
    # dense_lse case with bounds (torch's flash before c8d5eb5, Triton since: `attn_seconds`),
    # never cuDNN; of several, Triton
    family = "flash"
    compute = comm = 0.0
    row_bytes = (heads * 2 * head_dim * act, kv_heads * 2 * head_dim * act)  # as the runtime plans: Q+O, K+V
    for bounds in rows:
        p = _disagg_plan(tuple(bounds), world, eps, min_chunk, TASK_OVERHEAD if task_overhead is None else task_overhead,
                         row_bytes, disagg_speed(calib, heads, head_dim, triton_cost))
        per_server = [[] for _ in range(world)]
        moved_q = [0] * world
        for t in p.tasks:
            per_server[t.server].append((t.q_end - t.q_start, t.q_end - t.kv_start))
            if t.server != t.owner:
                moved_q[t.owner] += t.q_end - t.q_start
        times = [attn_seconds(calib, [AttnCall(tuple(segs), True, True)], heads, head_dim, family) if segs else 0.0
                 for segs in per_server]
        compute += max(times) + runtime_extra(calib, "disagg", bounds, heads, head_dim) / world
        # queries out and outputs back forward, dO out and dQ back backward; K/V rows travel with
        # their queries (once per server) and dK/dV back: about one K/V row per moved query row
        rows_out = max(moved_q)
        q_bytes = rows_out * heads * head_dim * act
        kv_bytes = rows_out * 2 * kv_heads * head_dim * act
        # every moved row leaves its rank: the all-to-all's (n-1)/n on-rank share does not apply
        a2a = lambda nbytes: collective_time("all_to_all", nbytes * world / max(1, world - 1), group, cluster,
                                             calib.comm)
        comm += 4 * a2a(q_bytes) + 2 * a2a(kv_bytes)
    if overlap == "distca":  # DistCA's schedule: the other nano-batch's attention hides the all-to-alls
        total = overlapped(compute, comm, calib.overlap_tax)
        return total, total - compute, compute
    schedule = "ping_pong" if overlap is True else (schedule or default_schedule(calib.era))
    if schedule in ("halves", "ping_pong", "local_remote"):
        return _ping_pong_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family, act, eps,
                                min_chunk, task_overhead, schedule, triton_cost=triton_cost)
    if schedule != "single":
        raise ValueError(f"parallel.disagg.schedule={schedule!r}: the simulator models single, halves, ping_pong, "
                         "local_remote")
    return compute + comm, comm, compute


def _ping_pong_layer(calib, cluster, rows, world, heads, kv_heads, head_dim, group, family, act, eps, min_chunk,
                     task_overhead, schedule="ping_pong", triton_cost=None):
    """(seconds, exposed, compute) of an overlapped `schedule` as seqpar's runtime runs it
    (attention/disagg/runtime.py, routing.nano_batches): `ping_pong`, the tasks in up to four
    nano-batches L1, R1, R2, L2, one varlen kernel call per nano-batch and server (so up to four
    calls' per-call cost); `halves` (the default from e23bcd3 to 219ea22), L1, R, L2, and
    `local_remote`, L, R, the same loop over up to three nano-batches; the backward runs them last
    to first (for L, R: R, L; the others are symmetric). Every input all-to-all issued up front, each output all-to-all issued by a rank when
    its own share of that nano-batch is computed; all on NCCL's one stream, in issue order, each
    starting when every rank has issued it. Remote K/V rows travel once per nano-batch that reads
    them (`_nano_bytes`). A rank that issued an all-to-all its peers have not joined yet keeps
    NCCL's kernel resident while it computes its next nano-batches: that overlap costs the fitted
    SM-sharing tax (`overlap_tax`), as overlapped transfers do. Forward and backward are timed
    alike (backward: 2.5 x the kernel time, dO in, dQ|dK|dV out); the layer is the slower rank's
    forward plus its backward."""
    from seqpar.attention.disagg.planner import TASK_OVERHEAD
    from seqpar.attention.disagg.routing import nano_batches
    from seqpar.sim.eras import era_since

    row_bytes = (heads * 2 * head_dim * act, kv_heads * 2 * head_dim * act)
    q_w, kv_w = heads * head_dim * act, 2 * kv_heads * head_dim * act  # one Q (O, dO, dQ) row; one K|V row
    a2a = lambda nbytes: collective_time("all_to_all", nbytes * world / max(1, world - 1), group, cluster, calib.comm)
    total = exposed = compute_total = 0.0
    for bounds in rows:
        bounds = tuple(bounds)
        p = _disagg_plan(bounds, world, eps, min_chunk, TASK_OVERHEAD if task_overhead is None else task_overhead,
                         row_bytes, disagg_speed(calib, heads, head_dim, triton_cost))
        per = bounds[-1] // world
        owned = [[(r * per, (r + 1) * per)] for r in range(world)]
        # without ping-pong: each server's local work halved around R (the runtime's code before
        # 755a3a8 and again since 852d464); in between (era 3) the same local work for L2 on every server
        if schedule == "halves" and era_since("755a3a8") <= calib.era < era_since("852d464"):
            groups = _equal_tail_batches(p.tasks, world, list(bounds), min_chunk, owned)
        else:
            groups = nano_batches(p.tasks, world, list(bounds), True, min_chunk, owned, schedule)
        work = []  # work[i][s]: server s's kernel time (fwd + bwd) in nano-batch i
        for g in groups:
            segs = [[] for _ in range(world)]
            for t in g:
                segs[t.server].append((t.q_end - t.q_start, t.q_end - t.kv_start))
            work.append([attn_seconds(calib, [AttnCall(tuple(x), True, True)], heads, head_dim, family) if x else 0.0
                         for x in segs])
        moved = [_nano_bytes(g, owned) for g in groups]  # (max Q rows, max K|V rows) received by a server
        fwd_in = [a2a(q * q_w + kv * kv_w) if q or kv else None for q, kv in moved]
        fwd_out = [a2a(q * q_w) if q else None for q, kv in moved]
        bwd_out = [a2a(q * q_w + kv * kv_w) if q or kv else None for q, kv in moved]
        fwd = _nano_schedule(work, 1 / 3.5, fwd_in, fwd_out, calib.overlap_tax)
        # dO in: one Q row each; last to first where that differs (L, R), as the runtime's backward
        back = (lambda x: x[::-1]) if schedule == "local_remote" else (lambda x: x)
        bwd = _nano_schedule(back(work), 2.5 / 3.5, back(fwd_out), back(bwd_out), calib.overlap_tax)
        kernels = max(sum(w[s] for w in work) for s in range(world))
        extra = runtime_extra(calib, "disagg", bounds, heads, head_dim) / world
        total += fwd + bwd + extra
        compute_total += kernels + extra
        exposed += fwd + bwd - kernels
    return total, exposed, compute_total


def _equal_tail_batches(tasks, world, bounds, min_chunk, owned):
    """routing.nano_batches's halves as 755a3a8 ran it (the era-3 runs; 852d464 reverted
    it, so the runtime no longer has it): L1, R, L2 with every server keeping the SAME local work
    for L2, half the least local work among the servers with remote work, so that the ranks join
    R's output all-to-all together; each server's L1 is a prefix of its local tasks in query order."""
    from seqpar.attention.disagg.planner import pairs
    from seqpar.attention.disagg.routing import _cut, _is_local

    cost = lambda t: pairs(t.q_start, t.q_end, t.kv_start, None)  # causal
    local = _is_local(bounds, True, owned)
    order = lambda g: sorted(g, key=lambda t: (t.q_start, t.server))
    if all(map(local, tasks)):
        return [order(tasks)] if tasks else []
    mine = [([t for t in tasks if t.server == s and local(t)], [t for t in tasks if t.server == s and not local(t)])
            for s in range(world)]
    work = lambda ts: sum(map(cost, ts))
    tail = min(work(loc) / 2 for loc, rem in mine if rem)
    groups = [[], [], []]
    for loc, rem in mine:
        head, acc, loc = work(loc) - tail, 0, sorted(loc, key=lambda t: t.q_start)
        first, second = loc, []
        for i, t in enumerate(loc):  # the prefix holding about `head` work
            if head <= 0:
                first, second = [], loc
                break
            if acc + cost(t) < head:
                acc += cost(t)
                continue
            if t.q_end - t.q_start >= 2 * min_chunk and acc + cost(t) > head:
                a, b = _cut(t, head - acc, cost, min_chunk)
                first, second = loc[:i] + [a], [b] + loc[i + 1:]
            else:  # the whole task to the nearer side
                cut = i + 1 if acc + cost(t) - head <= head - acc else i
                first, second = loc[:cut], loc[cut:]
            break
        groups[0] += first
        groups[1] += rem
        groups[2] += second
    return [order(g) for g in groups if g]


def _nano_bytes(tasks, owned) -> tuple[int, int]:
    """(Q rows, K|V rows) the busiest server receives in one nano-batch: the queries of its tasks
    owned elsewhere, and each K/V row it reads but does not hold, once (the runtime sends a row
    once per server and nano-batch)."""
    world = len(owned)
    q_rows, kv_ranges = [0] * world, [[] for _ in range(world)]
    for t in tasks:
        if t.server != t.owner:
            q_rows[t.server] += t.q_end - t.q_start
        kv_ranges[t.server].append((t.kv_start, t.q_end))
    kv_rows = []
    for s in range(world):
        merged = []
        for a, b in sorted(kv_ranges[s]):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        held = sum(max(0, min(b, y) - max(a, x)) for a, b in merged for x, y in owned[s])
        kv_rows.append(sum(b - a for a, b in merged) - held)
    return max(q_rows), max(kv_rows)


def _nano_schedule(work, share, inbound, outbound, tax) -> float:
    """Seconds of one pass (forward or backward) of the nano-batches on every rank: `work[i][r]`
    kernel seconds (fwd + bwd; `share` of it runs in this pass), `inbound[i]` / `outbound[i]` the
    all-to-all seconds of nano-batch i (None: no rank sends, no collective). Inputs are issued at
    the start, outputs as each rank finishes its share; NCCL runs them one after another in issue
    order, each once every rank has issued it. A rank computing while one of its issued outputs
    waits for its peers pays `tax` on that overlap."""
    n, world = len(work), len(work[0]) if work else 0
    comm_free, in_done = 0.0, []
    for t in inbound:
        if t is None:
            in_done.append(0.0)
        else:
            comm_free += t
            in_done.append(comm_free)
    clock = [0.0] * world
    spans = [[] for _ in range(world)]  # each rank's compute intervals
    issued = [[0.0] * world for _ in range(n)]
    for i in range(n):
        for r in range(world):
            start = max(clock[r], in_done[i])
            end = start + share * work[i][r]
            if end > start:
                spans[r].append((start, end))
            issued[i][r] = clock[r] = end
    finish = list(clock)
    last_out = 0.0
    for i, t in enumerate(outbound):
        if t is None:
            continue
        start = max(comm_free, max(issued[i]))
        comm_free = last_out = start + t
        for r in range(world):  # NCCL's kernel resident on rank r from its issue until the peers join
            wait = (issued[i][r], start)
            finish[r] += tax * sum(max(0.0, min(b, wait[1]) - max(a, wait[0])) for a, b in spans[r])
    return max(max(finish), last_out)


def disagg_moved_bytes(bounds, world, heads, kv_heads, head_dim, act=2, eps=0.1, min_chunk=128,
                       task_overhead=None, speed=None) -> float:
    """Bytes the busiest sender puts on the wire per layer (fwd + bwd) for the tasks that leave
    their owner: what `disagg_layer` times (queries, outputs, dO, dQ, K/V and dK/dV rows)."""
    from seqpar.attention.disagg.planner import TASK_OVERHEAD

    row_bytes = (heads * 2 * head_dim * act, kv_heads * 2 * head_dim * act)
    p = _disagg_plan(tuple(bounds), world, eps, min_chunk, TASK_OVERHEAD if task_overhead is None else task_overhead,
                     row_bytes, speed)
    moved_q = [0] * world
    for t in p.tasks:
        if t.server != t.owner:
            moved_q[t.owner] += t.q_end - t.q_start
    return max(moved_q) * (4 * heads + 2 * 2 * kv_heads) * head_dim * act


def disagg_speed(calib, heads: int, head_dim: int, triton_cost: float | None = None):
    """The KernelSpeed disagg's planner is given (runtime.kernel_speed): from a8a710a on, where the
    servers' calls run the split's lse form; None before (every pair the same). `triton_cost`: the
    run's parallel.disagg.triton_cost (None: the era's default). Query rows cost from 3a77b25 on."""
    from seqpar.attention.disagg.planner import ROW_COST, TRITON_COST, KernelSpeed
    from seqpar.kernels.flash_attn.split import max_doc_len
    from seqpar.sim.eras import era_since

    server_call = AttnCall(((2, 2),), True, True)  # bounds and an lse, as every server call
    if calib.era < era_since("a8a710a") or not lse_split_applies(calib, server_call):
        return None
    return KernelSpeed(split_min_len(calib, heads), max_doc_len(heads, head_dim, 2), lse_prefix_applies(calib),
                       triton_cost or _default_triton_cost(calib.era, TRITON_COST),
                       ROW_COST if calib.era >= era_since("3a77b25") else 0)


def _default_triton_cost(era: int, today: float) -> float:
    """parallel.disagg.triton_cost's default in a code era: 1.7, 1.55 from ff4de8f, 1.3 from be4b206."""
    from seqpar.sim.eras import era_since

    return today if era >= era_since("be4b206") else 1.55 if era >= era_since("ff4de8f") else 1.7


@functools.lru_cache(maxsize=1024)
def _disagg_plan(bounds: tuple[int, ...], world, eps, min_chunk, overhead, row_bytes, speed=None):
    from seqpar.attention.disagg import plan

    return plan(list(bounds), world, eps=eps, min_chunk=min_chunk, overhead=overhead, row_bytes=row_bytes,
                speed=speed)


def lasp_layer(calib, cluster, rows, world, heads, head_dim, group, method="lasp2"):
    """Linear attention on the local tokens plus, over N > 1 ranks, LASP's state exchange."""
    local = sum(b[-1] for b in rows) // world
    kernel = linear_attn_time(local, heads, head_dim, head_dim, calib.linear_tokens_per_s, calib.linear_ref_hdd)
    if world == 1:
        return kernel, 0.0, kernel
    extra = calib.lasp_call_s + calib.lasp_token_s * local
    state = heads * head_dim * head_dim * 4  # one fp32 state per head
    if method == "ring":
        # ring attention applied to linear layers (LASP-2's baseline): K/V travel instead of states;
        # each visiting chunk costs its state (k^T v) and its readout (q S): half the kernel's passes
        shard = 2 * local * heads * head_dim * 2
        transfer = 3 * collective_time("send_recv", shard, group, cluster, calib.comm) * len(rows)
        total = kernel + (world - 1) * overlapped(kernel / 2, transfer, calib.overlap_tax)
        return total, total - kernel * (1 + (world - 1) / 2), kernel * (1 + (world - 1) / 2)
    if method == "lasp1":
        comm = 2 * (world - 1) * collective_time("send_recv", state, group, cluster, calib.comm)
    else:
        comm = 2 * collective_time("all_gather", state * world, group, cluster, calib.comm)
    comm *= len(rows)
    return kernel + extra + comm, comm, kernel + extra


def usp_groups(sizes: dict, ulysses: int, gpus_per_node: int):
    """(Ulysses group, ring group) of usp: Ulysses the inner `ulysses` ranks of cp, the ring across."""
    tp = sizes.get("tp", 1)
    return placed(ulysses, tp, gpus_per_node), placed(sizes["cp"] // ulysses, tp * ulysses, gpus_per_node)
