"""`disagg_attention`: the ring_attention contract, computed by core-attention servers.

Every rank computes the same plan from the global document boundaries. One all-to-all sends each
task's queries to its server, another the key/value rows the server needs (each row once per
server, however many of its tasks read it); the server runs ONE varlen flash call over all its
tasks (queries are the last rows of their key range: bottom-right causal alignment) and a third
all-to-all returns the outputs. The backward mirrors it inside one autograd.Function: dO goes to
the servers, which kept their inputs, outputs and LSE of this step; dQ returns to the query
owners and dK/dV, summed over the tasks that read a row, to the key owners.
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seqpar.attention.disagg.planner import plan_owned
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
from seqpar.parallel.sharding import group_size_rank, local_ranges


def disagg_attention(q, k, v, *, group=None, causal=True, cu_seqlens=None, softmax_scale=None, layout="contiguous",
                     eps=0.1, min_chunk=128):
    """`min_chunk` (beyond the ring contract): the planner's smallest query piece it cuts."""
    world, rank = group_size_rank(group)
    B, s_local = q.shape[:2]
    seq_len = s_local * world
    if cu_seqlens is None:  # equal-length rows are documents of one packed row (as allgather does)
        bounds = tuple(range(0, B * seq_len + 1, seq_len))
    else:
        if B != 1:
            raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got {B}")
        bounds = tuple(int(x) for x in cu_seqlens.tolist())
        if bounds[-1] != seq_len:
            raise ValueError(f"cu_seqlens ends at {bounds[-1]}, the group holds {seq_len} tokens")
    route = _route(bounds, seq_len, world, rank, layout, float(eps), int(min_chunk), bool(causal))
    flat = [t.reshape(B * s_local, *t.shape[2:]) for t in (q, k, v)]
    out = _DisaggAttention.apply(*flat, route, group, causal, softmax_scale)
    return out.reshape(B, s_local, *out.shape[1:])


@dataclass(frozen=True)
class _Route:
    """This rank's part of the plan, as (start, length) segments of row indices."""
    q_send: tuple        # local query rows to send, grouped by server in rank order
    q_send_splits: list
    q_recv_splits: list  # query rows this server receives from each owner
    kv_send: tuple       # local key/value rows to send, grouped by server
    kv_send_splits: list
    kv_recv_splits: list
    task_kv: tuple       # rows of the received key/value buffer, per task in order (may repeat)
    cu_q: list           # the server's varlen boundaries over its tasks
    cu_k: list


@functools.lru_cache(maxsize=64)  # every layer of a step plans the same boundaries
def _route(bounds, seq_len, world, rank, layout, eps, min_chunk, causal) -> _Route:
    rows = (bounds[-1]) // seq_len
    # owned chunks in local storage order (row-major, then the layout's chunk order)
    owned = [[(row * seq_len + a, row * seq_len + b) for row in range(rows)
              for a, b in local_ranges(seq_len, world, r, layout)] for r in range(world)]
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

    tasks = plan_owned(list(bounds), owned, eps=eps, min_chunk=min_chunk).tasks
    doc_end = {bounds[i]: bounds[i + 1] for i in range(len(bounds) - 1)}
    key_end = (lambda t: t.q_end) if causal else (lambda t: doc_end[t.kv_start])

    # Queries: owner r sends server s its tasks on s in plan order; the server stores them by owner.
    q_send, q_send_splits = [], [0] * world
    for s in range(world):
        for t in tasks:
            if t.server == s and t.owner == rank:
                (_, _, _, loc), = pieces(t.q_start, t.q_end)  # a task lies inside one chunk
                q_send.append((loc, t.q_end - t.q_start))
                q_send_splits[s] += t.q_end - t.q_start
    mine = sorted((t for t in tasks if t.server == rank), key=lambda t: t.owner)  # stable: plan order per owner
    q_recv_splits = [sum(t.q_end - t.q_start for t in mine if t.owner == o) for o in range(world)]

    def needed(s):
        """Key/value pieces server s needs: per document, one range up to its furthest task."""
        ends = {}
        for t in tasks:
            if t.server == s:
                ends[t.kv_start] = max(ends.get(t.kv_start, 0), key_end(t))
        return [p for d in sorted(ends) for p in pieces(d, ends[d])]

    kv_send, kv_send_splits = [], [0] * world
    for s in range(world):
        for a, b, r, loc in needed(s):
            if r == rank:
                kv_send.append((loc, b - a))
                kv_send_splits[s] += b - a
    # The server's receive buffer: pieces grouped by owner (rank order), global order inside.
    recv = sorted(needed(rank), key=lambda p: p[2])
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
    return _Route(tuple(_merge(q_send)), q_send_splits, q_recv_splits, tuple(_merge(kv_send)), kv_send_splits,
                  kv_recv_splits, tuple(_merge(task_kv)), cu_q, cu_k)


def _merge(segs):
    """Adjacent (start, length) segments joined: fewer aranges to build per call."""
    out = []
    for s, n in segs:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + n)
        else:
            out.append((s, n))
    return out


def _index(segs, device) -> torch.Tensor:
    if not segs:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat([torch.arange(s, s + n, device=device) for s, n in segs])


def _all_to_all(x, send_splits, recv_splits, group):
    if len(send_splits) == 1:
        return x
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv_splits),
                           input_split_sizes=list(send_splits), group=group)
    return out


class _DisaggAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, route, group, causal, scale):
        dev, n = q.device, q.shape[0]
        hkv, dk, dv = k.shape[1], k.shape[2], v.shape[2]
        q_idx, kv_idx, task_idx = (_index(s, dev) for s in (route.q_send, route.kv_send, route.task_kv))
        q_srv = _all_to_all(q.index_select(0, q_idx), route.q_send_splits, route.q_recv_splits, group)
        # K and V travel in one message per pair of ranks: rows of [k | v]
        kv = torch.cat([k.reshape(n, -1), v.reshape(n, -1).to(k.dtype)], dim=1)
        kv_srv = _all_to_all(kv.index_select(0, kv_idx), route.kv_send_splits, route.kv_recv_splits, group)
        kv_task = kv_srv.index_select(0, task_idx)  # rows shared by several tasks are copied here, not sent
        k_task = kv_task[:, :hkv * dk].reshape(-1, hkv, dk)
        v_task = kv_task[:, hkv * dk:].reshape(-1, hkv, dv).to(v.dtype)
        cu_q, cu_k = (torch.tensor(c, dtype=torch.int32, device=dev) for c in (route.cu_q, route.cu_k))
        if q_srv.shape[0]:
            o_srv, lse = flash_attn(q_srv[None], k_task[None], v_task[None], causal=causal, cu_seqlens_q=cu_q,
                                    cu_seqlens_k=cu_k, softmax_scale=scale, return_lse=True)
            o_srv = o_srv[0]
        else:  # a server without tasks still takes part in every all-to-all
            o_srv, lse = q.new_zeros(0, q.shape[1], dv), None
        o_back = _all_to_all(o_srv, route.q_recv_splits, route.q_send_splits, group)
        out = q.new_empty(n, q.shape[1], dv)
        out[q_idx] = o_back  # every local query is in exactly one task
        ctx.save_for_backward(q_srv, k_task, v_task, o_srv, lse, q_idx, kv_idx, task_idx, cu_q, cu_k)
        ctx.route, ctx.group, ctx.causal, ctx.scale, ctx.n = route, group, causal, scale, n
        ctx.shapes = (hkv, dk, dv, kv.shape[1], k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_srv, k_task, v_task, o_srv, lse, q_idx, kv_idx, task_idx, cu_q, cu_k = ctx.saved_tensors
        route, group, n = ctx.route, ctx.group, ctx.n
        hkv, dk, dv, width, k_dtype, v_dtype = ctx.shapes
        do_srv = _all_to_all(dout.contiguous().index_select(0, q_idx), route.q_send_splits, route.q_recv_splits,
                             group)
        if q_srv.shape[0]:
            dq_t, dk_t, dv_t = flash_attn_backward(do_srv[None], q_srv[None], k_task[None], v_task[None],
                                                   o_srv[None], lse, causal=ctx.causal, cu_seqlens_q=cu_q,
                                                   cu_seqlens_k=cu_k, softmax_scale=ctx.scale)
            dq_srv = dq_t[0]
            dkv_task = torch.cat([dk_t[0].reshape(-1, hkv * dk), dv_t[0].reshape(-1, hkv * dv).to(k_dtype)], dim=1)
        else:
            dq_srv = q_srv.new_zeros(q_srv.shape)
            dkv_task = k_task.new_zeros(0, width)
        # a key row read by several tasks of this server: its gradients summed here, sent once
        dkv_srv = dkv_task.new_zeros(sum(route.kv_recv_splits), width).index_add_(0, task_idx, dkv_task)
        dq_back = _all_to_all(dq_srv, route.q_recv_splits, route.q_send_splits, group)
        dkv_back = _all_to_all(dkv_srv, route.kv_recv_splits, route.kv_send_splits, group)
        dq = dq_back.new_empty(n, *dq_back.shape[1:])
        dq[q_idx] = dq_back
        # a key row sent to several servers: the owner sums their gradients
        dkv = dkv_back.new_zeros(n, width).index_add_(0, kv_idx, dkv_back)
        dk_ = dkv[:, :hkv * dk].reshape(n, hkv, dk)
        dv_ = dkv[:, hkv * dk:].reshape(n, hkv, dv).to(v_dtype)
        return dq, dk_, dv_, None, None, None, None
