"""`disagg_attention`: the ring_attention contract, computed by core-attention servers.

Every rank computes the same plan from the global document boundaries. One all-to-all sends each
task's queries to its server, another the key/value rows the server needs (each row once per
server and nano-batch, however many of its tasks read it); the server runs ONE varlen flash call
over its tasks (queries are the last rows of their key range: bottom-right causal alignment) and
a third all-to-all returns the outputs. The backward mirrors it inside one autograd.Function: dO
goes to the servers, which kept their inputs, outputs and LSE of this step; dQ returns to the
query owners and dK/dV, summed over the tasks that read a row, to the key owners.

Ping-pong (`routing.nano_batches`): the tasks run as up to four nano-batches, local work L1,
remote work R1 and R2, local work L2. Every input transfer is issued asynchronously up front and
every output transfer as soon as its nano-batch is computed, so remote inputs travel during L1
(and R1) and outputs during R2 and L2. A nano-batch without transfers on any rank skips its
collectives. On CUDA, NCCL runs async collectives on its own stream and `wait()` only orders the
compute stream after them, so no extra stream is needed.

Across data-parallel ranks (`parallel.disagg.group=dp_cp`) nothing here changes: the group is
dp_cp and `cu_seqlens` are those of the ranks' rows joined by `rows.join_row_bounds`.
"""
from __future__ import annotations

import functools
import time
import weakref

import torch
import torch.distributed as dist

from seqpar.attention.disagg import metrics
from seqpar.attention.disagg.options import current, planner_overhead
from seqpar.attention.disagg.planner import plan_owned
from seqpar.attention.disagg.routing import Route, nano_batches, route
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
from seqpar.parallel.sharding import group_size_rank, local_ranges


def disagg_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="contiguous",
                     eps=None, min_chunk=None, ping_pong=None):
    """Beyond the ring contract: `eps`, `min_chunk`, `ping_pong` (None: the process-wide
    `parallel.disagg.*` options, see `options.configure`; eps defaults to 0.1)."""
    opts = current()
    eps = opts.eps if eps is None else eps
    min_chunk = opts.min_chunk if min_chunk is None else min_chunk
    ping_pong = opts.ping_pong if ping_pong is None else ping_pong
    world, rank = group_size_rank(group)
    B, s_local = q.shape[:2]
    seq_len = s_local * world
    if cu_seqlens is None:  # equal-length rows are documents of one packed row (as allgather does)
        bounds = tuple(range(0, B * seq_len + 1, seq_len))
    else:
        if B != 1:
            raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got {B}")
        bounds = _host_bounds(cu_seqlens)
        if bounds[-1] != seq_len:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]}, the group holds {seq_len} tokens")
    hq, hkv = q.shape[2], k.shape[2]
    q_row = hq * (q.shape[3] + v.shape[3]) * q.element_size()  # Q sent, O returned
    kv_row = hkv * (k.shape[3] + v.shape[3]) * k.element_size()
    misses = _plan_routes.cache_info().misses
    routes, info = _plan_routes(bounds, seq_len, world, rank, layout, float(eps), int(min_chunk), bool(causal),
                                planner_overhead(opts), (q_row, kv_row), bool(ping_pong))
    metrics.record_call(info, sum(r.sent_rows(q_row, kv_row) for r in routes),
                        new=_plan_routes.cache_info().misses > misses)
    flat = [t.reshape(B * s_local, *t.shape[2:]) for t in (q, k, v)]
    out = _DisaggAttention.apply(*flat, routes, group, causal, softmax_scale)
    return out.reshape(B, s_local, *out.shape[1:])


_last_bounds: list = [None, -1, None]  # weakref to the last cu_seqlens, its version, its host copy


def _host_bounds(cu_seqlens) -> tuple:
    """cu_seqlens on the host. Every layer of a step passes the same tensor: reading it once
    spares a device sync per layer (the copy is reused while that tensor lives, unmodified)."""
    ref, version, bounds = _last_bounds
    if ref is not None and ref() is cu_seqlens and version == cu_seqlens._version:
        return bounds
    bounds = tuple(int(x) for x in cu_seqlens.tolist())
    _last_bounds[:] = [weakref.ref(cu_seqlens), cu_seqlens._version, bounds]
    return bounds


@functools.lru_cache(maxsize=64)  # every layer of a step plans the same boundaries
def _plan_routes(bounds, seq_len, world, rank, layout, eps, min_chunk, causal, overhead, row_bytes, ping_pong):
    t0 = time.perf_counter()
    rows = bounds[-1] // seq_len
    # owned chunks in local storage order (row-major, then the layout's chunk order)
    owned = [[(row * seq_len + a, row * seq_len + b) for row in range(rows)
              for a, b in local_ranges(seq_len, world, r, layout)] for r in range(world)]
    p = plan_owned(list(bounds), owned, eps=eps, min_chunk=min_chunk, causal=causal, overhead=overhead,
                   row_bytes=row_bytes)
    groups = nano_batches(p.tasks, world, bounds, causal, min_chunk, owned) if ping_pong and world > 1 else [p.tasks]
    routes = tuple(route(ts, bounds, owned, rank, causal) for ts in groups)
    info = {"imbalance_before": p.initial_imbalance, "imbalance_after": p.imbalance, "tasks": len(p.tasks),
            "plan_ms": (time.perf_counter() - t0) * 1e3}
    return routes, info


def _index(segs, device) -> torch.Tensor:
    """Row indices of (start, length) segments, built on the host and copied once: one arange
    per segment on the GPU would be one kernel launch each."""
    if not segs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, s + n) for s, n in segs]).to(device)


def _all_to_all(x, send_splits, recv_splits, group, collective=True):
    """Asynchronous all_to_all_single: (output, work or None); wait on work before reading.
    Without a collective (`collective` False on every rank alike), x is what this rank sends
    itself, already in the receiver's order."""
    if len(send_splits) == 1 or not collective:
        return x, None
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv_splits),
                                  input_split_sizes=list(send_splits), group=group, async_op=True)
    return out, work


def _wait(device, *works):
    works = [w for w in works if w is not None]
    if works:
        with metrics.exposed_wait(device):
            for w in works:
                w.wait()


@functools.lru_cache(maxsize=16)  # every layer of a step reuses its plan's index tensors
def _nano(r: Route, device) -> "_Nano":
    return _Nano(r, device)


class _Nano:
    """One nano-batch's index tensors and varlen boundaries on this rank's device."""

    def __init__(self, r: Route, device):
        self.r = r
        self.q_idx, self.kv_idx, self.task_idx = (_index(s, device) for s in (r.q_send, r.kv_send, r.task_kv))
        self.cu_q, self.cu_k = (torch.tensor(c, dtype=torch.int32, device=device) for c in (r.cu_q, r.cu_k))

    def q_to_servers(self, x, group):
        return _all_to_all(x, self.r.q_send_splits, self.r.q_recv_splits, group, self.r.collective)

    def kv_to_servers(self, x, group):
        return _all_to_all(x, self.r.kv_send_splits, self.r.kv_recv_splits, group, self.r.collective)

    def q_to_owners(self, x, group):
        return _all_to_all(x, self.r.q_recv_splits, self.r.q_send_splits, group, self.r.collective)

    def kv_to_owners(self, x, group):
        return _all_to_all(x, self.r.kv_recv_splits, self.r.kv_send_splits, group, self.r.collective)


class _DisaggAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, routes, group, causal, scale):
        dev, n = q.device, q.shape[0]
        hkv, dk, dv = k.shape[1], k.shape[2], v.shape[2]
        nanos = [_nano(r, dev) for r in routes]
        # K and V travel in one message per pair of ranks: rows of [k | v]
        kv = torch.cat([k.reshape(n, -1), v.reshape(n, -1).to(k.dtype)], dim=1)
        inbound = []
        for nb in nanos:  # every input transfer issued up front: the later ones travel during compute
            q_srv, wq = nb.q_to_servers(q.index_select(0, nb.q_idx), group)
            kv_srv, wkv = nb.kv_to_servers(kv.index_select(0, nb.kv_idx), group)
            inbound.append((q_srv, kv_srv, wq, wkv))
        outbound, saved = [], []
        for nb, (q_srv, kv_srv, wq, wkv) in zip(nanos, inbound):
            _wait(dev, wq, wkv)
            kv_task = kv_srv.index_select(0, nb.task_idx)  # rows shared by several tasks are copied here, not sent
            k_task = kv_task[:, :hkv * dk].reshape(-1, hkv, dk)
            v_task = kv_task[:, hkv * dk:].reshape(-1, hkv, dv).to(v.dtype)
            if q_srv.shape[0]:
                o_srv, lse = flash_attn(q_srv[None], k_task[None], v_task[None], causal=causal, cu_seqlens_q=nb.cu_q,
                                        cu_seqlens_k=nb.cu_k, softmax_scale=scale, return_lse=True)
                o_srv = o_srv[0]
            else:  # a server without tasks still takes part in every all-to-all
                o_srv, lse = q.new_zeros(0, q.shape[1], dv), q.new_zeros(1, q.shape[1], 0)
            outbound.append(nb.q_to_owners(o_srv, group))
            saved += [q_srv, k_task, v_task, o_srv, lse]
        out = q.new_empty(n, q.shape[1], dv)
        for nb, (o_back, work) in zip(nanos, outbound):
            _wait(dev, work)
            out[nb.q_idx] = o_back  # every local query is in exactly one task of one nano-batch
        ctx.save_for_backward(*saved)
        ctx.nanos, ctx.group, ctx.causal, ctx.scale, ctx.n = nanos, group, causal, scale, n
        ctx.shapes = (hkv, dk, dv, kv.shape[1], k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved, nanos, group, n = ctx.saved_tensors, ctx.nanos, ctx.group, ctx.n
        hkv, dk, dv, width, k_dtype, v_dtype = ctx.shapes
        dout = dout.contiguous()
        inbound = [nb.q_to_servers(dout.index_select(0, nb.q_idx), group)
                   for nb in nanos]
        outbound = []
        for i, (nb, (do_srv, work)) in enumerate(zip(nanos, inbound)):
            q_srv, k_task, v_task, o_srv, lse = saved[5 * i:5 * i + 5]
            _wait(dout.device, work)
            if q_srv.shape[0]:
                dq_t, dk_t, dv_t = flash_attn_backward(do_srv[None], q_srv[None], k_task[None], v_task[None],
                                                       o_srv[None], lse, causal=ctx.causal, cu_seqlens_q=nb.cu_q,
                                                       cu_seqlens_k=nb.cu_k, softmax_scale=ctx.scale)
                dq_srv = dq_t[0]
                dkv_task = torch.cat([dk_t[0].reshape(-1, hkv * dk), dv_t[0].reshape(-1, hkv * dv).to(k_dtype)],
                                     dim=1)
            else:
                dq_srv = q_srv.new_zeros(q_srv.shape)
                dkv_task = k_task.new_zeros(0, width)
            # a key row read by several tasks of this server: its gradients summed here, sent once
            dkv_srv = dkv_task.new_zeros(sum(nb.r.kv_recv_splits), width).index_add_(0, nb.task_idx, dkv_task)
            outbound.append((nb.q_to_owners(dq_srv, group),
                             nb.kv_to_owners(dkv_srv, group)))
        dq = dkv = None
        for nb, ((dq_back, wq), (dkv_back, wkv)) in zip(nanos, outbound):
            _wait(dout.device, wq, wkv)
            if dq is None:
                dq = dq_back.new_empty(n, *dq_back.shape[1:])
                dkv = dkv_back.new_zeros(n, width)
            dq[nb.q_idx] = dq_back
            # a key row sent to several servers (or nano-batches): the owner sums their gradients
            dkv.index_add_(0, nb.kv_idx, dkv_back)
        dk_ = dkv[:, :hkv * dk].reshape(n, hkv, dk)
        dv_ = dkv[:, hkv * dk:].reshape(n, hkv, dv).to(v_dtype)
        return dq, dk_, dv_, None, None, None, None
