"""`disagg_attention`: the ring_attention contract, computed by core-attention servers.

Every rank computes the same plan from the global document boundaries. Per nano-batch one
all-to-all sends each server the queries of its tasks and the key/value rows it needs (each row
once per server and nano-batch, however many of its tasks read it); the server runs ONE varlen
flash call over its tasks (queries are the last rows of their key range: bottom-right causal
alignment) and a second all-to-all returns the outputs. The backward mirrors it inside one
autograd.Function: dO goes to the servers, which kept their inputs, outputs and LSE of this
step; dQ returns to the query owners and dK/dV, summed over the tasks that read a row, to the key
owners, in one message.

What a rank keeps for itself is never staged: its own tasks read its q/k/v in place, and when
nothing arrives the server's buffers are those tensors and its outputs are the results (a plan
that moves nothing runs exactly local attention, with no copy and no collective). What travels
is packed and unpacked with contiguous row slices joined by one torch.cat per buffer
(`routing.Assembly`); gradients of rows read by several tasks are summed slice by slice.

Results land in the final tensors: where a server serves only its own rows in a nano-batch, it
reads them as one slice (rows of other tasks between them become documents without keys) and its
kernel calls write outputs, dQ, dK and dV straight into the rank's final tensors (`out=`, `dq=`,
`dk=`/`dv=` with `accumulate` where an earlier nano-batch wrote those key rows); only what
arrives from elsewhere, or what a mixed server call computed, is copied in (`routing.Placement`).
On 2 ranks at 128k tokens each (wlbllm, prolong; bf16, H=32/8, D=128; bytes written by copy ops
per rank and layer, fwd+bwd, counted on CPU, 2026-11-26) that cut the copies from 2.9-5.5 GB to
0.09-0.34 GB with local work then remote work as two nano-batches (the halves schedule below adds
up to 0.3 GB per rank on those batches) and to 0.36-0.97 GB with ping-pong. A server call that mixes
local and remote tasks (the single schedule's, where work moved) copies its outputs in.

Four schedules (`parallel.disagg.schedule`); the backward runs their nano-batches last to first:

- `single` (the default): the tasks run as one nano-batch. Each server's inputs arrive before its
  one kernel call per direction, its outputs leave after it: the transfers are exposed, but every
  server launches one call on all its work, where the overlapped schedules make two to four, each
  with its own launch and last-wave tail, and NCCL's kernels compete with them for SMs. On 2 H100
  (16 batches of each mix, 64k and 128k tokens per GPU, methods timed in rounds, 2026-11-26) it was
  the fastest of the three on every mix: 1.048-1.134x the balanced ideal against 1.060-1.168x.
- `halves`: local work L1, remote work R, local work L2 (`routing.nano_batches`): the same
  messages as one nano-batch, each server's local work halved so that it computes while the remote
  inputs travel (L1) and while the outputs return (L2); in backward likewise.
- `local_remote`: local work L, then remote work R, neither cut: the same messages, one call
  more per server than `single`. The forward's Q|K|V travel while L computes (O returns exposed);
  the backward runs R first, so dO arrives exposed and dQ|dK|dV, the larger message, return while
  L computes. It hides the large transfers without halves' third call and the pieces over a
  prefix that its cut of the local work makes.
- `ping_pong`: local work L1, remote work R1 and R2, local work L2 (`routing.nano_batches`). Every
  input transfer is issued asynchronously up front and every output transfer as soon as its
  nano-batch is computed, so remote inputs travel during L1 (and R1) and outputs during R2 and L2.

Two plans (`parallel.disagg.plans=per_direction`): the forward is planned with a Triton score
pair at its forward cost (`planner.TRITON_FWD_COST`, 1.06 cuDNN pairs) and the backward with
`triton_cost` (1.3), each balanced for its own direction; with one plan (the default, balanced for the
backward) the server given the Triton pieces is underloaded in the forward, and every layer's forward
waits for the other (2 H100, llama_1b 64k tokens per GPU, 2026-11-27: the step's ratio to the
balanced ideal followed the modelled forward imbalance, 1.048 at eps 0.02, correlation 0.89; per
direction the model gives 1.007). The forward's servers then keep nothing; the owners keep the lse,
returned beside the outputs, and the backward sends its servers Q|K|V, O|dO and the lse again, as
DistCA's backward does. Where the two plans hold the same tasks (one kernel runs every task: CPU,
a forced kernel; or no Triton work moves) the one plan serves both directions.

A nano-batch without transfers on any rank skips its collectives. On CUDA, NCCL runs async
collectives on its own stream and `wait()` only orders the compute stream after them, so no extra
stream is needed.

Across data-parallel ranks (`parallel.disagg.group=dp_cp`) nothing here changes: the group is
dp_cp and `cu_seqlens` are those of the ranks' rows joined by `rows.join_row_bounds`.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from seqpar.attention.disagg import metrics
from seqpar.attention.disagg.options import PLANS, SCHEDULES, current, planner_overhead
from seqpar.attention.disagg.planner import TRITON_FWD_COST, KernelSpeed, plan_owned
from seqpar.attention.disagg.routing import Route, nano_batches, owner_assemblies, owner_placements, route
from seqpar.kernels import backend
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
from seqpar.kernels.flash_attn.split_tasks import cudnn_lengths
from seqpar.parallel.sharding import group_size_rank, host_bounds, local_ranges


def disagg_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="contiguous",
                     eps=None, min_chunk=None, schedule=None, plans=None):
    """Beyond the ring contract: `eps`, `min_chunk`, `schedule`, `plans` (None: the process-wide
    `parallel.disagg.*` options, see `options.configure`; eps defaults to 0.1)."""
    opts = current()
    eps = opts.eps if eps is None else eps
    min_chunk = opts.min_chunk if min_chunk is None else min_chunk
    schedule = opts.schedule if schedule is None else schedule
    plans = opts.plans if plans is None else plans
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}")
    if plans not in PLANS:
        raise ValueError(f"plans={plans!r}: choose one of {PLANS}")
    world, rank = group_size_rank(group)
    B, s_local = q.shape[:2]
    seq_len = s_local * world
    if cu_seqlens is None:  # equal-length rows are documents of one packed row (as allgather does)
        bounds = tuple(range(0, B * seq_len + 1, seq_len))
    else:
        if B != 1:
            raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got {B}")
        bounds = host_bounds(cu_seqlens)
        if bounds[-1] != seq_len:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]}, the group holds {seq_len} tokens")
    hq, hkv = q.shape[2], k.shape[2]
    q_row = hq * (q.shape[3] + v.shape[3]) * q.element_size()  # Q sent, O returned
    kv_row = hkv * (k.shape[3] + v.shape[3]) * k.element_size()
    misses = _plan_routes.cache_info().misses
    args = (bounds, seq_len, world, rank, layout, float(eps), int(min_chunk), bool(causal), planner_overhead(opts),
            (q_row, kv_row), schedule)
    speed = kernel_speed(q, k, v, opts)
    routes, info = _plan_routes(*args, speed)
    routes_b = None
    if plans == "per_direction" and speed is not None:  # the forward balanced for its own Triton speed
        fwd_routes, fwd_info = _plan_routes(*args, replace(speed, triton_cost=TRITON_FWD_COST))
        info = {**info, "plan_ms": info["plan_ms"] + fwd_info["plan_ms"]}
        if fwd_info["plan"] != info["plan"]:  # the same tasks: the one plan serves both directions
            routes, routes_b = fwd_routes, routes
    # bytes: each plan's rows out and back once (the backward's own plan also sends O, dO and the lse)
    metrics.record_call(info, sum(r.sent_rows(q_row, kv_row) for r in routes + (routes_b or ())),
                        new=_plan_routes.cache_info().misses > misses)
    flat = [t.reshape(B * s_local, *t.shape[2:]) for t in (q, k, v)]
    out = _DisaggAttention.apply(*flat, routes, group, causal, softmax_scale, routes_b)
    return out.reshape(B, s_local, *out.shape[1:])


def kernel_speed(q, k, v, opts) -> KernelSpeed | None:
    """Which of the servers' tasks cuDNN runs and what a pair costs on Triton, for the planner;
    None where one kernel runs them all (CPU, the Triton kernel forced, ...)."""
    n_q, n_k = q.shape[1], k.shape[1]  # what a server's call is: packed tasks, lse returned
    tasks_q, tasks_k = (0, n_q // 2, n_q), (0, n_k // 2, n_k)
    if backend("flash_attn", q, k, v, return_lse=True, cu_seqlens_q=tasks_q, cu_seqlens_k=tasks_k) != "split":
        return None
    return KernelSpeed(*cudnn_lengths(q), opts.triton_cost)


@functools.lru_cache(maxsize=64)  # every layer of a step plans the same boundaries
def _plan_routes(bounds, seq_len, world, rank, layout, eps, min_chunk, causal, overhead, row_bytes, schedule,
                 speed=None):
    t0 = time.perf_counter()
    rows = bounds[-1] // seq_len
    # owned chunks in local storage order (row-major, then the layout's chunk order)
    owned = [[(row * seq_len + a, row * seq_len + b) for row in range(rows)
              for a, b in local_ranges(seq_len, world, r, layout)] for r in range(world)]
    p = plan_owned(list(bounds), owned, eps=eps, min_chunk=min_chunk, causal=causal, overhead=overhead,
                   row_bytes=row_bytes, speed=speed)
    groups = (schedule != "single" and nano_batches(p.tasks, world, bounds, causal, min_chunk, owned, schedule)
              or [sorted(p.tasks, key=lambda t: (t.q_start, t.server))])
    routes = tuple(route(ts, bounds, owned, rank, causal) for ts in groups)
    info = {"imbalance_before": p.initial_imbalance, "imbalance_after": p.imbalance, "tasks": len(p.tasks),
            "plan_ms": (time.perf_counter() - t0) * 1e3, "plan": tuple(p.tasks)}
    return routes, info


@functools.lru_cache(maxsize=64)  # every layer of a step reuses its plan's boundaries
def _device_cu(r: Route, device) -> tuple[torch.Tensor, torch.Tensor]:
    return _to_device(r.cu_q, device), _to_device(r.cu_k, device)


def _to_device(values, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int32)
    if device.type == "cuda":  # from pinned memory the copy does not make the host wait for the GPU
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    # kernels that want the bounds on the host (torch's varlen flash its longest document, the
    # split its tasks) read them here instead of from the device, which would make the host wait
    # for the GPU at every call
    t.seqpar_max_seqlen = max((b - a for a, b in zip(values, values[1:])), default=0)
    t.seqpar_bounds = tuple(values)
    return t


_owner = functools.lru_cache(maxsize=64)(owner_assemblies)
_placements = functools.lru_cache(maxsize=64)(owner_placements)


def _dest(place, full, i):
    """Nano-batch i's rows of the final tensor `full` as its kernel's destination `[1, n, ...]`,
    with whether to add into them; (None, False) when they come from its sources instead."""
    span = None if place is None else place.direct[i]
    if span is None:
        return None, False
    start, n, accumulate = span
    return full[start:start + n][None], accumulate


def _exchange(parts_to, send, recv, like, group, collective):
    """Asynchronous all_to_all_single of flat messages: `parts_to[s]` are the tensors for rank s,
    `send`/`recv` element counts per rank. Returns (the received flat buffer, work) or
    (None, None) when no rank sends anything in this nano-batch (`collective` False everywhere alike)."""
    if not collective:
        return None, None
    flat = [p.reshape(-1) for parts in parts_to for p in parts]
    x = flat[0] if len(flat) == 1 else torch.cat(flat) if flat else like.new_empty(0)
    out = like.new_empty(sum(recv))
    return out, all_to_all(out, x, list(recv), list(send), group)


def _all_to_all(out, x, recv, send, group):
    return dist.all_to_all_single(out, x, output_split_sizes=recv, input_split_sizes=send, group=group,
                                  async_op=True)


# The runtime's only collective, looked up at every call: the benchmark swaps it to time the
# same call without its transfers, and records what it sends to time the transfers alone
# (seqpar/bench/disagg.py). Returns the async work (None: nothing to wait for).
all_to_all = _all_to_all


def _fields(buf, rows, shapes):
    """Per rank, the views of its section of a received flat buffer: `rows[o]` = row counts of
    each field, `shapes` = the fields' trailing shapes. None for every rank without a buffer."""
    if buf is None:
        return [[None] * len(shapes) for _ in rows]
    widths = [math.prod(s) for s in shapes]
    sections = buf.split([sum(n * w for n, w in zip(ns, widths)) for ns in rows])
    out = []
    for ns, sec in zip(rows, sections):
        views = sec.split([n * w for n, w in zip(ns, widths)])
        out.append([x.view(n, *s) for x, n, s in zip(views, ns, shapes)])
    return out


def _wait(device, phase, *works):
    works = [w for w in works if w is not None]
    if works:
        with metrics.exposed_wait(device, phase):
            for w in works:
                w.wait()


def _pack(*pairs) -> list:
    """The pieces of (assembly, source) pairs, in order, for one message (None: nothing)."""
    return [p for a, src in pairs if a is not None for p in a.parts([src], src)]


class _Counts:
    """Per rank, the rows and elements of this rank's messages in one nano-batch; its own rows
    never travel. Toward the servers: Q|K|V (forward), dO (backward); toward the owners: O and the
    lse (forward), dQ|dK|dV (backward). A backward planned apart sends Q|K|V, O|dO and the lse."""

    def __init__(self, r: Route, wq: int, wkv: int, wo: int, wl: int):
        others = lambda splits: [0 if i == r.rank else n for i, n in enumerate(splits)]
        qs, qr, ks, kr = map(others, (r.q_send_splits, r.q_recv_splits, r.kv_send_splits, r.kv_recv_splits))
        self.sent_rows, self.recv_rows = list(zip(qs, ks, ks)), list(zip(qr, kr, kr))  # (q, k, v) rows
        self.sent_q_rows, self.recv_q_rows = [(n,) for n in qs], [(n,) for n in qr]
        self.sent = [a * wq + b * wkv for a, b in zip(qs, ks)]  # Q|K|V out; dQ|dK|dV back in
        self.recv = [a * wq + b * wkv for a, b in zip(qr, kr)]
        self.sent_o, self.recv_o = [n * wo for n in qs], [n * wo for n in qr]  # O back in, dO out
        self.sent_l, self.recv_l = [n * wl for n in qs], [n * wl for n in qr]  # the lse, as O


def _counts(routes, q, k, v) -> list:
    wo = q.shape[-2] * v.shape[-1]
    return [_Counts(r, math.prod(q.shape[-2:]), math.prod(k.shape[-2:]) + math.prod(v.shape[-2:]), wo, q.shape[-2])
            for r in routes]


def _send_inputs(routes, counts, q, k, v, group):
    """Every nano-batch's Q|K|V transfer to its servers, issued up front: they travel during compute."""
    flat = q.new_empty(0)
    return [_exchange([_pack((a, q), (b, k), (b, v)) for a, b in zip(r.send_q, r.send_kv)], c.sent, c.recv,
                      flat, group, r.collective) for r, c in zip(routes, counts)]


def _server_inputs(r, c, q, k, v, got):
    """The server's query and task key/value buffers from its own rows and the received ones."""
    got = _fields(got, c.recv_rows, (q.shape[1:], k.shape[1:], v.shape[1:]))
    return (r.srv_q([q] + [g[0] for g in got], q), r.srv_kv([k] + [g[1] for g in got], k),
            r.srv_kv([v] + [g[2] for g in got], v))


class _DisaggAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, routes, group, causal, scale, routes_b):
        dev = q.device
        metrics.mark("fwd", dev)
        k_dtype, v_dtype = k.dtype, v.dtype
        k, v = k.to(q.dtype), v.to(q.dtype)  # one message carries all three
        sq, sk, sv, so = q.shape[1:], k.shape[1:], v.shape[1:], (q.shape[1], v.shape[2])
        counts = _counts(routes, q, k, v)
        flat = q.new_empty(0)
        apart = routes_b is not None  # the backward has its own plan: the owners keep the lse, servers nothing
        lse_flat = flat.new_empty(0, dtype=torch.promote_types(q.dtype, torch.float32))
        inbound = _send_inputs(routes, counts, q, k, v, group)
        # where a nano-batch serves one slice of this rank's own rows, its kernel writes the final output
        place, _ = _placements(routes)
        out = None if place is None else q.new_empty(q.shape[0], *so)
        outbound, saved, o_parts, lse_parts = [], [], [], []
        for i, (r, c, (buf, work)) in enumerate(zip(routes, counts, inbound)):
            _wait(dev, "fwd_in", work)
            metrics.mark(f"fwd in{i}", dev)
            q_srv, k_task, v_task = _server_inputs(r, c, q, k, v, buf)
            direct = _dest(place, out, i)[0]
            if q_srv.shape[0]:
                cu_q, cu_k = _device_cu(r, dev)
                o_srv, lse = flash_attn(q_srv[None], k_task[None], v_task[None], causal=causal, cu_seqlens_q=cu_q,
                                        cu_seqlens_k=cu_k, softmax_scale=scale, return_lse=True, out=direct)
                o_srv = o_srv[0]
            else:  # a server without tasks still takes part in every all-to-all
                o_srv, lse = q.new_zeros(0, *so), lse_flat.new_zeros(1, so[0], 0)
            metrics.mark(f"fwd attn{i}", dev)
            outbound.append(_exchange(_by_owner(r, o_srv), c.recv_o, c.sent_o, flat, group, r.collective))
            # a view of the output is rebuilt in backward from the output itself (saved once)
            o_parts.append(None if direct is not None else o_srv)
            if apart:
                rows = lse[0].transpose(0, 1).to(lse_flat.dtype).contiguous()  # [rows, heads]: routed as O is
                lse_parts.append(rows)
                outbound[-1] += _exchange(_by_owner(r, rows), c.recv_l, c.sent_l, lse_flat, group, r.collective)
            else:
                saved += [q_srv, k_task, v_task, o_parts[-1], lse]
        sources, lse_sources = [], []
        for i, (c, o_srv, back) in enumerate(zip(counts, o_parts, outbound)):
            _wait(dev, "fwd_out", *back[1::2])
            metrics.mark(f"fwd out{i}", dev)
            sources += [o_srv] + [g[0] for g in _fields(back[0], c.sent_q_rows, (so,))]
            if apart:
                lse_sources += [lse_parts[i]] + [g[0] for g in _fields(back[2], c.sent_q_rows, (so[:1],))]
        if place is None:
            out = _owner(routes)[0](sources, q.new_empty(0, *so))
        else:
            place.finish(out, sources)
        metrics.mark("fwd end", dev)
        if apart:
            saved = [q, k, v, _owner(routes)[0](lse_sources, lse_flat.new_empty(0, so[0]))]
        ctx.save_for_backward(out, *saved)
        ctx.routes, ctx.counts, ctx.group, ctx.causal, ctx.scale = routes, counts, group, causal, scale
        ctx.routes_b, ctx.shapes = routes_b, (sq, sk, sv, so, k_dtype, v_dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        out, *saved = ctx.saved_tensors
        dev = dout.device
        metrics.mark("bwd", dev)
        dout = dout.contiguous()
        flat = dout.new_empty(0)
        # the nano-batches last to first: the forward's last (remote) work first, so that its
        # gradients return while the local work computes (`local_remote`; the others are symmetric)
        if ctx.routes_b is None:  # the servers kept their inputs: dO goes to them
            routes, counts, n = ctx.routes[::-1], ctx.counts[::-1], len(ctx.routes)
            q_place = _placements(ctx.routes)[0]  # where the forward wrote its outputs
            inbound = [_exchange([_pack((a, dout)) for a in r.send_q], c.sent_o, c.recv_o, flat, ctx.group,
                                 r.collective) for r, c in zip(routes, counts)]

            def inputs(i, r, c):
                j = n - 1 - i  # the forward's nano-batch
                q_srv, k_task, v_task, o_srv, lse = saved[5 * j:5 * j + 5]
                if o_srv is None:
                    o_srv = _dest(q_place, out, j)[0][0]
                buf, work = inbound[i]
                _wait(dev, "bwd_in", work)
                do_srv = r.srv_q([dout] + [g[0] for g in _fields(buf, c.recv_q_rows, (out.shape[1:],))], dout)
                return q_srv, k_task, v_task, o_srv, lse, do_srv
        else:  # the backward's own plan: its servers get Q|K|V, O|dO and the lse of their tasks
            q, k, v, lse_own = saved
            routes = ctx.routes_b[::-1]
            counts = _counts(routes, q, k, v)
            inbound = _send_inputs(routes, counts, q, k, v, ctx.group)
            with_o = [_exchange([_pack((a, out), (a, dout)) for a in r.send_q], [2 * n for n in c.sent_o],
                                [2 * n for n in c.recv_o], flat, ctx.group, r.collective)
                      for r, c in zip(routes, counts)]
            with_lse = [_exchange([_pack((a, lse_own)) for a in r.send_q], c.sent_l, c.recv_l, lse_own.new_empty(0),
                                  ctx.group, r.collective) for r, c in zip(routes, counts)]

            def inputs(i, r, c):
                (buf, work), (obuf, owork), (lbuf, lwork) = inbound[i], with_o[i], with_lse[i]
                _wait(dev, "bwd_in", work, owork, lwork)
                q_srv, k_task, v_task = _server_inputs(r, c, q, k, v, buf)  # k, v saved in q's dtype
                got = _fields(obuf, [(n, n) for (n,) in c.recv_q_rows], (out.shape[1:], out.shape[1:]))
                o_srv = r.srv_q([out] + [g[0] for g in got], out)
                do_srv = r.srv_q([dout] + [g[1] for g in got], dout)
                lse = r.srv_q([lse_own] + [g[0] for g in _fields(lbuf, c.recv_q_rows, (lse_own.shape[1:],))], lse_own)
                return q_srv, k_task, v_task, o_srv, lse.transpose(0, 1)[None].contiguous(), do_srv
        return _serve_backward(ctx, routes, counts, dout, inputs)


def _serve_backward(ctx, routes, counts, dout, inputs):
    """The servers' backward calls on `inputs(i, route, counts)` = (q, k, v, out, lse, dO) of
    nano-batch i, their gradients returned to the owners and placed or joined there."""
    group = ctx.group
    sq, sk, sv, so, k_dtype, v_dtype = ctx.shapes
    dev = dout.device
    q_place, kv_place = _placements(routes)
    # the final gradients, where some nano-batch's kernel writes straight into them
    dq = None if q_place is None else dout.new_empty(dout.shape[0], *sq)
    dk, dv = (None, None) if kv_place is None else (dout.new_empty(dout.shape[0], *sk),
                                                     dout.new_empty(dout.shape[0], *sv))
    flat = dout.new_empty(0)
    outbound, grads = [], []
    for i, (r, c) in enumerate(zip(routes, counts)):
        q_srv, k_task, v_task, o_srv, lse, do_srv = inputs(i, r, c)
        metrics.mark(f"bwd in{i}", dev)
        if q_srv.shape[0]:
            cu_q, cu_k = _device_cu(r, dev)
            dk_i, accumulate = _dest(kv_place, dk, i)
            dq_t, dk_t, dv_t = flash_attn_backward(do_srv[None], q_srv[None], k_task[None], v_task[None],
                                                   o_srv[None], lse, causal=ctx.causal, cu_seqlens_q=cu_q,
                                                   cu_seqlens_k=cu_k, softmax_scale=ctx.scale,
                                                   dq=_dest(q_place, dq, i)[0], dk=dk_i,
                                                   dv=_dest(kv_place, dv, i)[0], accumulate=accumulate)
            dq_srv, dk_task, dv_task = dq_t[0], dk_t[0], dv_t[0]
        else:
            dq_srv, dk_task, dv_task = q_srv.new_zeros(q_srv.shape), k_task, v_task
        metrics.mark(f"bwd attn{i}", dev)
        # a key row read by several tasks of this server: its gradients summed here, sent once
        back = [b + _pack((a, dk_task), (a, dv_task)) for b, a in zip(_by_owner(r, dq_srv), r.back_kv)]
        outbound.append(_exchange(back, c.recv, c.sent, flat, group, r.collective))
        grads.append((dq_srv, dk_task, dv_task))
    sources = ([], [], [])  # dq, dk, dv
    for i, (c, grad, (buf, work)) in enumerate(zip(counts, grads, outbound)):
        _wait(dev, "bwd_out", work)
        metrics.mark(f"bwd out{i}", dev)
        got = _fields(buf, c.sent_rows, (sq, sk, sv))
        for j, src in enumerate(sources):
            src += [grad[j]] + [g[j] for g in got]
    # a key row sent to several servers (or nano-batches): the owner sums their gradients
    own_q, own_kv = _owner(routes)
    dq = own_q(sources[0], dout.new_empty(0, *sq)) if q_place is None else q_place.finish(dq, sources[0])
    if kv_place is None:
        dk, dv = own_kv(sources[1], dout.new_empty(0, *sk)), own_kv(sources[2], dout.new_empty(0, *sv))
    else:
        dk, dv = kv_place.finish(dk, sources[1]), kv_place.finish(dv, sources[2])
    metrics.mark("bwd end", dev)
    return dq, dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None


def _by_owner(r: Route, x) -> list:
    """Rows of the server buffer `x` per owner that sent them (none for this rank's own)."""
    return [[] if o == r.rank or not m else [x[r.q_off[o]:r.q_off[o] + m]] for o, m in enumerate(r.q_recv_splits)]
