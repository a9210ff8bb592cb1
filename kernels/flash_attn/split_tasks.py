"""The split's lse form: `flash_attn` with return_lse over tasks given by separate query and key
boundaries (ring steps, disagg servers), no autograd, long tasks through cuDNN and the rest
through one Triton call, as `split.py` does for packed rows of self-attention.

Stateless, so that `split_backward` (or any backward that takes out and lse) can follow
`split_forward`: the padded queries' lse is not kept, the backward gives them +inf.

Causal, a piece of n >= min_len queries over m > n keys (a disagg server's piece of a document over
its prefix) runs on cuDNN: its prefix in non-causal calls of min_len keys, then one causal call of
its queries over the rest (`split.prefix_chunks`), merged in fp32 like ring blocks
(SEQPAR_CUDNN_PREFIX=0 keeps it in the Triton call; on 2 H200, llama_1b dp=2 64k tokens per GPU,
disagg at eps 0.02 ran 1.025x / 1.030x the balanced ideal with it against 1.036x / 1.042x without,
docs/benchmarks/2026-11-28-gpu-29th). Every such shape is one of a 1D grid that
`split.prebuild_plans` builds before training. (A first form, one non-causal call over a bucketed
prefix, met a new (queries, prefix) shape at most steps for hundreds of steps, each new shape's
plans ~0.2 s of host time while the other ranks waited at the next all-to-all: end to end on 2 H200,
llama_1b, 64k tokens per GPU, 1.071x the balanced ideal over 8 steps against 1.050x off,
docs/benchmarks/2026-11-26-2gpu-10th and 2026-11-27-2gpu-11th.)
Causal, a task whose keys pass max_len gives cuDNN its head (`split.cudnn_head`) and its tail where
that is a piece cuDNN takes (`split.cudnn_tail`; otherwise, or with SEQPAR_CUDNN_PREFIX=0, the tail
runs in the Triton call): the key rows both read get both calls' dk, dv.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from seqpar.kernels.attn_merge import attn_merge_
from seqpar.kernels.flash_attn.split import (SplitKernels, _fold, _host_bounds, _pad_rows, _rows, bucket_len,
                                             buckets_per_octave, cudnn_triton_kernels, max_doc_len, min_doc_len,
                                             prefix_chunk, prefix_chunks, split_task_bounds)

PREFIX_ENV = "SEQPAR_CUDNN_PREFIX"  # 0: causal pieces over a prefix in the Triton call (benchmarks' A/B)


def cudnn_prefix() -> bool:
    """Whether causal pieces over a prefix run on cuDNN (by default; SEQPAR_CUDNN_PREFIX=0: not)."""
    return os.environ.get(PREFIX_ENV, "1").strip() not in ("0", "")


@dataclass(frozen=True)
class TaskPlan:
    long_tasks: tuple  # ((qa, qb, ka, kb, p, f), ...): tasks that cuDNN runs (prefix_chunks: p, f)
    cu_q: torch.Tensor  # int32 boundaries of the Triton call
    cu_k: torch.Tensor
    per_octave: int
    chunk: int  # the prefix calls' keys (prefix_chunks)

    def bucket(self, length: int) -> int:
        return bucket_len(length, self.per_octave)


@lru_cache(maxsize=128)  # every layer of a step passes the same boundaries (and chunk: part of the key)
def task_plan(bounds_q: tuple, bounds_k: tuple, min_len: int, max_len: int | None, per_octave: int,
              device, causal: bool = False, cut: bool = False, chunk: int | None = None) -> TaskPlan:
    long_tasks, bq, bk = split_task_bounds(bounds_q, bounds_k, min_len, max_len, causal, cut)
    as_dev = lambda b: torch.tensor(b, dtype=torch.int32, device=device)  # noqa: E731
    chunk = chunk or prefix_chunk(min_len)
    parts = [prefix_chunks(qb - qa, kb - ka, chunk) for qa, qb, ka, kb in long_tasks]
    return TaskPlan(tuple((*t, p, f) for t, (p, f) in zip(long_tasks, parts)), as_dev(bq), as_dev(bk), per_octave,
                    chunk)


def cudnn_lengths(q) -> tuple[int, int, bool]:
    """(min_len, max_len, prefix) of the tasks a call on queries like `q` hands to cuDNN
    (`split.runs_on_cudnn`; prefix: causal pieces over a prefix too)."""
    H, D = q.shape[2:]
    return min_doc_len(H), max_doc_len(H, D, q.element_size()), cudnn_prefix()


def _task_plan_for(q, cu_q, cu_k, min_len, max_len, per_octave, causal) -> TaskPlan:
    lo, hi, prefix = cudnn_lengths(q)
    min_len = lo if min_len is None else min_len
    return task_plan(_host_bounds(cu_q), _host_bounds(cu_k), min_len, hi if max_len is None else max_len,
                     buckets_per_octave() if per_octave is None else per_octave, q.device, bool(causal) and prefix,
                     bool(causal), prefix_chunk(min_len))


def _blank_front(t, a, b, front, rows):
    """Rows [a, b) of t after `front` zero rows, zeros up to `rows` (`_rows` where front is 0)."""
    if not front:
        return _rows(t, a, b, rows)
    padded = t.new_zeros(1, rows, *t.shape[2:])
    padded[:, front:front + b - a].copy_(t[:, a:b])
    return padded


def _with_inf(lse, front, rows):
    """lse `[1, H, n]` at rows [front, front + n) of `rows`, +inf elsewhere (padded queries: P = 0)."""
    padded = torch.full((*lse.shape[:2], rows), float("inf"), dtype=lse.dtype, device=lse.device)
    padded[:, :, front:front + lse.shape[2]] = lse
    return padded


@torch.no_grad()
def split_forward(q, k, v, *, causal=True, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, out=None,
                  min_len=None, max_len=None, per_octave=None, kernels: SplitKernels | None = None):
    """(out, lse) of packed attention with separate query and key boundaries (`flash_attn` with
    return_lse and cu_seqlens_q/_k, no autograd), its long tasks (squares, and causal pieces over a
    prefix) through cuDNN: the split for ring steps and disagg servers. Stateless, so that
    `split_backward` (or any backward that takes out and lse) can follow it: the padded queries' lse
    is not kept (see split_backward)."""
    plan = _task_plan_for(q, cu_seqlens_q, cu_seqlens_k, min_len, max_len, per_octave, causal)
    kn = kernels or cudnn_triton_kernels()
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    o, lse, _ = kn.packed_fwd(q, k, v, causal, plan.cu_q, plan.cu_k, scale)
    group = q.shape[2] // k.shape[2]
    for qa, qb, ka, kb, p, f in plan.long_tasks:
        n, t = qb - qa, kb - ka - p  # t: the causal call's keys, the last of the task's
        rows = plan.bucket(f + n) if causal else n
        od, ld = kn.dense_fwd(_blank_front(q, qa, qb, f, rows), _rows(k, kb - t, kb, rows, group),
                              _rows(v, kb - t, kb, rows, group), causal, scale)
        od, ld = od[:, f:f + n], ld[:, :, f:f + n]
        if p:  # the prefix's first p keys, seen by every query, a chunk a call, merged in fp32
            q_rows, c, od = _rows(q, qa, qb, plan.bucket(n)), plan.chunk, od.to(ld.dtype)  # lse: fp32 or fp64
        for a in range(ka, ka + p, plan.chunk):
            o2, l2 = kn.dense_fwd(q_rows, _rows(k, a, a + c, c, group), _rows(v, a, a + c, c, group), False, scale)
            od, ld = attn_merge_(od, o2[:, :n], ld, l2[:, :, :n], od)  # the union of the calls' keys
        o[:, qa:qb].copy_(od)  # the Triton call left zeros here
        lse[:, :, qa:qb].copy_(ld)
    return (o if out is None else out.copy_(o)), lse


@torch.no_grad()
def split_backward(dout, q, k, v, out, lse, *, causal=True, cu_seqlens_q, cu_seqlens_k, softmax_scale=None,
                   dq=None, dk=None, dv=None, accumulate=False, min_len=None, max_len=None, per_octave=None,
                   kernels: SplitKernels | None = None):
    """(dq, dk, dv) of `split_forward`'s attention from its out and lse (or any equal ones).

    A long task runs padded to its bucket as in the forward; the padded queries get dout = 0 and
    lse = +inf, so their P = exp(S - lse) is 0 and they add nothing to the keys' gradients, with no
    state kept from the forward. Key rows that several tasks read are separate rows of the call's
    keys (the varlen layout), so each gradient row comes from one task. `dq`, `dk`, `dv`,
    `accumulate`: as flash_attn_backward's."""
    plan = _task_plan_for(q, cu_seqlens_q, cu_seqlens_k, min_len, max_len, per_octave, causal)
    kn = kernels or cudnn_triton_kernels()
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    gq, gk, gv = kn.packed_bwd(dout, q, k, v, out, lse, causal, plan.cu_q, plan.cu_k, scale, None, None)
    group = q.shape[2] // k.shape[2]
    for qa, qb, ka, kb, p, f in plan.long_tasks:
        # each call's backward with the task's merged out and lse: exact gradients of its keys
        n, t = qb - qa, kb - ka - p
        rows = plan.bucket(f + n) if causal else n
        d_out = _blank_front(dout, qa, qb, f, rows) if f else _pad_rows(dout[:, qa:qb], rows)  # zeros around
        d_q, d_k, d_v = kn.dense_bwd(d_out,
                                     _blank_front(q, qa, qb, f, rows), _rows(k, kb - t, kb, rows, group),
                                     _rows(v, kb - t, kb, rows, group), _blank_front(out, qa, qb, f, rows),
                                     _with_inf(lse[:, :, qa:qb], f, rows), causal, scale)
        gq[:, qa:qb].copy_(d_q[:, f:f + n])  # the Triton call left zeros in these rows
        gk[:, kb - t:kb] += _fold(d_k[:, :t], group)  # zeros too, or a cut task's tail's share
        gv[:, kb - t:kb] += _fold(d_v[:, :t], group)
        if p:
            rows, c = plan.bucket(n), plan.chunk
            padded = (_pad_rows(dout[:, qa:qb], rows), _rows(q, qa, qb, rows))
            merged = (_rows(out, qa, qb, rows), _with_inf(lse[:, :, qa:qb], 0, rows))
        for a in range(ka, ka + p, plan.chunk):
            d_q, d_k, d_v = kn.dense_bwd(*padded, _rows(k, a, a + c, c, group), _rows(v, a, a + c, c, group), *merged,
                                         False, scale)
            gq[:, qa:qb] += d_q[:, :n]
            gk[:, a:a + c] += _fold(d_k, group)
            gv[:, a:a + c] += _fold(d_v, group)
    from seqpar.kernels.flash_attn import _deliver
    return tuple(g if dest is None else _deliver(dest, g, accumulate and i > 0)
                 for i, (g, dest) in enumerate(zip((gq, gk, gv), (dq, dk, dv))))


def warm_up(heads: int, kv_heads: int, head_dim: int, *, dtype=torch.bfloat16, device="cuda", scale=None,
            min_len: int | None = None, kernels: SplitKernels | None = None) -> None:
    """Runs `split_forward` and `split_backward` once over a causal piece over a prefix (cuDNN's
    calls and their merge) beside a short task (the Triton call, separate query and key boundaries),
    so that the Triton kernels only this path launches are compiled before training, not inside
    the first step in which a rank serves such a piece while the other ranks wait for it (its cuDNN
    shapes are `split.prebuild_plans`'s). `min_len`, `kernels`: as split_forward's (tests)."""
    n = min_len or min_doc_len(heads)
    m = n + prefix_chunk(n) + 7  # a prefix of one chunk, and blank rows before the causal call's queries
    cu_q = torch.tensor([0, n, n + 3], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, m, m + 8], dtype=torch.int32, device=device)
    q = torch.randn(1, n + 3, heads, head_dim, dtype=dtype, device=device)
    k, v = (torch.randn(1, m + 8, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
    kw = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softmax_scale=scale, min_len=n, kernels=kernels)
    out, lse = split_forward(q, k, v, **kw)
    split_backward(torch.randn_like(out), q, k, v, out, lse, **kw)
