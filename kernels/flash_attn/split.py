"""Packed attention split by document length: long documents through cuDNN, the rest through ONE
Triton varlen call.

cuDNN runs dense causal fwd+bwd at ~540 TFLOP/s on H100/H200, seqpar's Triton kernel at ~360-394,
and in lognormal packed rows the few long documents hold most of the work (86-90% at 16k/64k for
documents of >= 4096 tokens). So each document of at least `min_len` tokens runs as one dense
cuDNN call on its slice, and everything else runs as one Triton call over the whole row in which
each long document [a, b) is cut into two pieces: (queries a..b, no keys) and (no queries, keys
a..b). The Triton kernel gives such query rows out = 0, lse = -inf (dq = 0) and such key rows
dk = dv = 0 without touching the document's keys: a piece without queries has no query tile,
one without keys no key tile, and the other side's loops are empty (tests/test_flash_triton.py
interp_packed, tests/test_flash_split.py interp_ with exactly these boundaries). The cuDNN results
then overwrite those slices (copy_: the aten ops take no destination), dk and dv add to them (the
zeros, or the tail's share where a document was cut, below). One Triton call, not one
per run of short documents: a row of many short documents would otherwise pay a launch (and a
tile table) each; a row of long documents only still launches it, to store zeros.

cuDNN builds (and caches) an execution plan per shape, ~80 ms per new length on H200 (measured,
docs/benchmarks/split_attn_gpu.sh), and training packs new lengths every step: that cost alone
made rows of fresh lengths 13x slower than Triton. So a long document of L tokens runs padded to
its bucket length (`bucket_len`: 16 per octave, at most 1/16 longer, ~3% more work on average):
a few dozen plans per run, each built once. The padding follows the document: the row's own next
tokens where the row has them (a view, no copy), else zeros. Causality keeps the real queries off
the padded keys, the padded queries' outputs are dropped, and in the backward their dout is zero,
so they add nothing to the real keys' dk, dv (dS = P * (dP - delta) with dP = delta = 0; their
forward lse is kept so that P stays finite).

A document runs through cuDNN only up to `max_doc_len` tokens: its calls allocate up to ten
tensors of its length at the query heads (below), which `SEQPAR_CUDNN_SCRATCH_MB` bounds (default
2 GiB; seqpar.memory counts it). Of a longer causal document cuDNN takes the head, its first
max_doc_len queries over their keys (their causal square), and the Triton call the tail: its
queries over all the document's keys (bottom-right aligned), so both calls read the head's keys
and their dk, dv add up (`cudnn_head`; on 2 H100 a score pair's backward ran 1.74x longer on Triton
than on cuDNN, docs/benchmarks/2026-11-26-2gpu-9th/call7).

GQA: cuDNN here takes equal head counts (kernels/flash_attn/aten.py), so a long document's k, v
slices are expanded to the query heads (a transient copy of 2 x L x Hq x D elements per long
document, made again in the backward rather than kept) and its dk, dv summed back over each group.

Gradients through the lse (return_lse=True and a loss that uses it): cuDNN's backward takes no
dlse, so that backward runs the Triton kernel over the whole row with the original boundaries.

The lse form for ring steps and disagg servers (tasks with separate query and key boundaries,
no autograd) is `split_tasks.py`; the planning both share (`split_task_bounds`, `prefix_chunks`,
the buckets and bounds) is here.

The host needs the document lengths: `_host_bounds` reads cu_seqlens once per boundaries tensor
and version (one device-to-host sync per tensor, cached weakly on it, as every layer of a step
passes the same one; none where the caller attached the host values), and the plans are cached
by those values.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

MIN_DOC_LEN = 4096
MIN_DOC_ENV = "SEQPAR_CUDNN_DOC_MIN"
# ... and at least this many tokens x query heads: a cuDNN call of few heads has a small grid
# ((length / 128) x heads tiles), and one Triton call over the row takes those documents faster.
# Packed lognormal rows (documents up to 11k) fwd+bwd on one H200, split with the 4096 floor
# against Triton at 32k / 64k tokens (docs/benchmarks/2026-11-26-4gpu-7th/call2, flash_heads_gpu.sh):
# 4 heads 3.32 / 2.49 and 5.87 / 4.35 ms, 8 heads 4.82 / 4.41 and 7.78 / 8.53, 16 heads 7.20 /
# 8.44 and 14.6 / 17.1: the floor holds from 16 heads on (64k tokens x heads); at 4 heads no
# document of those rows qualifies (16k), a long one still does.
MIN_DOC_HEAD_TOKENS = 65536
# What a long document's cuDNN call may allocate beside the Triton call's tensors (MiB): its dq,
# dk, dv, K/V expanded to the query heads under GQA, padded copies at the row's end
SCRATCH_MB = 2048
SCRATCH_ENV = "SEQPAR_CUDNN_SCRATCH_MB"
BUCKETS_PER_OCTAVE = 16
BUCKETS_ENV = "SEQPAR_CUDNN_BUCKETS"


def min_doc_len(heads: int | None = None) -> int:
    """Documents of at least this many tokens go to cuDNN: SEQPAR_CUDNN_DOC_MIN where set (read per
    call so that benchmarks can flip it), else MIN_DOC_LEN, raised for calls of few query `heads` to
    MIN_DOC_HEAD_TOKENS / heads."""
    raw = os.environ.get(MIN_DOC_ENV, "").strip()
    if not raw:
        return MIN_DOC_LEN if heads is None else max(MIN_DOC_LEN, -(-MIN_DOC_HEAD_TOKENS // heads))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MIN_DOC_ENV}={raw!r}: need a positive token count (default {MIN_DOC_LEN})")
    return int(raw)


def scratch_per_token(hq: int, head_dim: int, elem: int) -> int:
    """Bytes per token of a long document's cuDNN calls at most: ten tensors of `hq` heads (in the
    backward K/V expanded to the query heads, dout, q and out padded at the row's end, cuDNN's dq,
    dk, dv and its fp32 dq accumulator). One llama_1b document of 128k tokens (32/8 heads, D = 64)
    held exactly ten at a step's peak, 5 GiB (H100, 2026-11-26, logging.memory_snapshot)."""
    return 10 * hq * head_dim * elem


def scratch_bytes() -> int:
    """What cuDNN's calls may allocate beside the other kernels' tensors: SEQPAR_CUDNN_SCRATCH_MB
    (default 2048; seqpar.memory counts it)."""
    raw = os.environ.get(SCRATCH_ENV, "").strip()
    if raw and (not raw.isdigit() or int(raw) < 1):
        raise ValueError(f"{SCRATCH_ENV}={raw!r}: need a positive number of MiB (default {SCRATCH_MB})")
    return (int(raw) if raw else SCRATCH_MB) << 20


def max_doc_len(hq: int, head_dim: int, elem: int) -> int:
    """Documents longer than this stay in the Triton call, so that the cuDNN calls' scratch stays
    within `scratch_bytes`."""
    return scratch_bytes() // scratch_per_token(hq, head_dim, elem)


def buckets_per_octave() -> int:
    """Bucket lengths per doubling of the length (SEQPAR_CUDNN_BUCKETS; 0 runs exact lengths, one
    cuDNN plan per distinct length)."""
    raw = os.environ.get(BUCKETS_ENV, "").strip()
    if not raw:
        return BUCKETS_PER_OCTAVE
    if not raw.isdigit() or int(raw) & (int(raw) - 1):
        raise ValueError(f"{BUCKETS_ENV}={raw!r}: need 0 (exact lengths) or a power of two "
                         f"(default {BUCKETS_PER_OCTAVE})")
    return int(raw)


def bucket_len(length: int, per_octave: int) -> int:
    """The smallest multiple of 2**(floor(log2 length)) / per_octave that holds `length` (at most
    1/per_octave longer); `length` itself for per_octave 0 or lengths below per_octave."""
    if per_octave == 0 or length < per_octave:
        return length
    step = max(1, (1 << (length.bit_length() - 1)) // per_octave)
    return -(-length // step) * step


def split_bounds(bounds, min_len: int, max_len: int | None = None, cut: bool = False):
    """(long documents [(a, b)], boundaries of q, boundaries of k) of the Triton call; long: at
    least `min_len` and at most `max_len` tokens; `cut` (causal attention): of a longer document,
    its head of max_len tokens (`cudnn_head`).

    Each long document [a, b) becomes two documents: (q a..b, k a..a) and (q b..b, k a..b); a cut
    one [a, c) with head [a, b): (q a..b, k a..a) and (q b..c, k a..c); the others keep their
    boundaries. Both lists have the same length, as the varlen kernel needs."""
    long_tasks, bq, bk = split_task_bounds(bounds, bounds, min_len, max_len, cut=cut)
    return [(qa, qb) for qa, qb, _, _ in long_tasks], bq, bk


def split_task_bounds(bounds_q, bounds_k, min_len: int, max_len: int | None = None, causal: bool = False,
                      cut: bool = False):
    """`split_bounds` for separate query and key boundaries (tasks: queries bounds_q[i]..[i+1] over
    keys bounds_k[i]..[i+1], causal aligned bottom-right; a disagg server's call). A task is long
    when it has min_len..max_len queries and as many keys (the causal square of one document, or
    of its head), or, `causal`, at least min_len queries over more keys whose causal call fits
    max_len (a piece of a document over its causal prefix, `runs_on_cudnn`): dense cuDNN calls
    compute it. `cut` (causal attention):
    a task too long gives cuDNN its head (`cudnn_head`) and keeps its tail, over all its keys, in
    the Triton call, or, `causal`, gives cuDNN the tail too where it is a piece it takes
    (`cudnn_tail`). Returns ([(qa, qb, ka, kb)], the Triton call's q and k boundaries)."""
    bq_in, bk_in = [int(x) for x in bounds_q], [int(x) for x in bounds_k]
    for bounds in (bq_in, bk_in):
        if len(bounds) < 2 or bounds[0] != 0 or any(x > y for x, y in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 (at least one document), got {bounds}")
    if len(bq_in) != len(bk_in):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count the same documents: {bq_in}, {bk_in}")
    long_tasks, bq, bk = [], [0], [0]
    for qa, qb, ka, kb in zip(bq_in, bq_in[1:], bk_in, bk_in[1:]):
        n, m = qb - qa, kb - ka
        if runs_on_cudnn(n, m, min_len, max_len, causal):
            head = n
        else:
            head = cudnn_head(n, m, min_len, max_len, causal) if cut else 0
        if head:  # its queries without keys here; after them the tail (if any) over all the keys
            long_tasks.append((qa, qa + head, ka, kb - n + head))
            if cudnn_tail(n, m, head, min_len, max_len, causal):
                long_tasks.append((qa + head, qb, ka, kb))
                head = n
            bq += [qa + head, qb]
            bk += [ka, kb]
        else:
            bq.append(qb)
            bk.append(kb)
    return long_tasks, bq, bk


def runs_on_cudnn(n: int, m: int, min_len: int, max_len: int | None, causal: bool) -> bool:
    """Whether a task of n queries over m keys is long (`split_task_bounds`): cuDNN computes it. A
    square of min_len..max_len; `causal`, also a piece of at least min_len queries over a prefix
    whose causal call (`prefix_chunks`: n queries after fewer than `prefix_chunk` blank ones) fits
    max_len."""
    if n < min_len or m < n or (m > n and not causal):
        return False
    return max_len is None or n + (m - n) % prefix_chunk(min_len) <= max_len


def cudnn_head(n: int, m: int, min_len: int, max_len: int | None, causal: bool) -> int:
    """Of a causal task of n queries over m >= n keys (bottom-right aligned) that cuDNN cannot take
    (`runs_on_cudnn`: too many queries or, without `causal`, keys for max_len), the first queries it
    can, as many as a long task may have (over a prefix only with `causal`); 0 where that is under
    min_len."""
    if max_len is None or m < n or runs_on_cudnn(n, m, min_len, max_len, causal):
        return 0
    head = max_len - ((m - n) % prefix_chunk(min_len) if causal else m - n)
    return head if 0 < head < n and runs_on_cudnn(head, m - n + head, min_len, max_len, causal) else 0


def cudnn_tail(n: int, m: int, head: int, min_len: int, max_len: int | None, causal: bool) -> bool:
    """Whether the tail of a cut task (its queries after a `head` that cuDNN takes, over all m keys)
    runs on cuDNN too: with pieces over a prefix (`causal`) where it is one (`runs_on_cudnn`). A
    document past max_len then runs wholly on cuDNN, as the model's one-document rows do (SDPA):
    on one H200 a 64k document at llama_1b's heads ran 170 ms fwd+bwd with its tail on Triton
    against 142-145 ms whole (docs/benchmarks/2026-11-28-gpu-28th/call3)."""
    return causal and 0 < head < n and runs_on_cudnn(n - head, m, min_len, max_len, True)


def prefix_chunks(n: int, m: int, chunk: int) -> tuple[int, int]:
    """How a causal task of n queries over m >= n keys (its causal square after r = m - n keys of
    prefix that every query sees) runs on cuDNN: (p, f). The first p = r - r % chunk prefix keys in
    non-causal calls of `chunk` keys each (merged in fp32 like ring blocks); the last f + n keys in
    one causal call of f = r % chunk blank queries before the n real ones. Every call's shape is
    then (a query bucket, chunk) or a causal square bucket: a grid of one dimension, each shape's
    cuDNN plans built before training (`prebuild_plans`), where a (queries, prefix) grid of two met
    new shapes at most steps, each stalling its step ~0.2 s. The blank rows cost < chunk^2 / 2 pairs."""
    r = m - n
    return r - r % chunk, r % chunk


PREFIX_CHUNK_ENV = "SEQPAR_CUDNN_PREFIX_CHUNK"


def prefix_chunk(min_len: int) -> int:
    """The keys of each non-causal prefix call (`prefix_chunks`): SEQPAR_CUDNN_PREFIX_CHUNK where set
    (read per call, for benchmarks' A/B), else min_len, the shortest call the split gives cuDNN."""
    raw = os.environ.get(PREFIX_CHUNK_ENV, "").strip()
    if not raw:
        return min_len
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{PREFIX_CHUNK_ENV}={raw!r}: need a positive token count (default: min_doc_len)")
    return int(raw)


@dataclass(frozen=True)
class SplitPlan:
    long_docs: tuple  # ((a, b), ...) token ranges that cuDNN runs
    cu_q: torch.Tensor  # int32 boundaries of the Triton call, on the tensors' device
    cu_k: torch.Tensor
    cu_full: torch.Tensor  # the original boundaries, int32 (the whole-row backward with dlse)
    tokens: int
    per_octave: int  # cuDNN's length buckets (bucket_len)

    def bucket(self, length: int) -> int:
        return bucket_len(length, self.per_octave)


def split_plan(cu_seqlens, min_len: int, device, per_octave: int = 0, max_len: int | None = None,
               causal: bool = False) -> SplitPlan:
    """The plan of these boundaries: their values read once per tensor and version (`_host_bounds`),
    the plan built once per values (and lengths, per_octave, device, causality: a causal document
    past max_len gives cuDNN its head), as `split_tasks.task_plan`'s."""
    return _self_plan(_host_bounds(cu_seqlens), min_len, max_len, per_octave, torch.device(device), bool(causal))


@lru_cache(maxsize=128)  # every layer of a step passes the same boundaries
def _self_plan(bounds: tuple, min_len: int, max_len: int | None, per_octave: int, device, causal: bool) -> SplitPlan:
    long_docs, bq, bk = split_bounds(bounds, min_len, max_len, cut=causal)
    as_dev = lambda b: torch.tensor(b, dtype=torch.int32, device=device)  # noqa: E731
    return SplitPlan(tuple(long_docs), as_dev(bq), as_dev(bk), as_dev(bounds), bounds[-1], per_octave)


class SplitKernels(NamedTuple):
    """The two kernels the split composes (tests pass the reference's in their place).

    dense_fwd(q, k, v, causal, scale) -> (out, lse `[B, H, L]`); equal head counts
    dense_bwd(dout, q, k, v, out, lse, causal, scale) -> (dq, dk, dv)
    packed_fwd(q, k, v, causal, cu_q, cu_k, scale) -> (out, lse, state)
    packed_bwd(dout, q, k, v, out, lse, causal, cu_q, cu_k, scale, dlse, state) -> (dq, dk, dv)
    `state`: what the forward leaves its backward on the same boundaries (Triton's tile table), or None
    """
    dense_fwd: Callable
    dense_bwd: Callable
    packed_fwd: Callable
    packed_bwd: Callable


@lru_cache(maxsize=None)
def cudnn_triton_kernels() -> SplitKernels:
    from seqpar.kernels.flash_attn import aten
    from seqpar.kernels.flash_attn import triton as ft

    def packed_fwd(q, k, v, causal, cu_q, cu_k, scale):
        return ft.attention_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softmax_scale=scale)

    def packed_bwd(dout, q, k, v, out, lse, causal, cu_q, cu_k, scale, dlse, q_table):
        return ft.attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     softmax_scale=scale, dlse=dlse, q_table=q_table)

    return SplitKernels(
        lambda q, k, v, causal, scale: aten.attention_with_lse(q, k, v, kernel="cudnn", causal=causal,
                                                               softmax_scale=scale),
        lambda dout, q, k, v, out, lse, causal, scale: aten.attention_backward(
            dout, q, k, v, out, lse, kernel="cudnn", causal=causal, softmax_scale=scale),
        packed_fwd, packed_bwd)


def prebuild_plans(heads: int, head_dim: int, *, dtype=torch.bfloat16, device="cuda", scale=None,
                   kernels: SplitKernels | None = None, prefix: bool = False) -> list[int]:
    """Builds cuDNN's forward and backward plans for every length bucket a long document of a call
    with `heads` query heads can run as (causal squares from `min_doc_len(heads)` to
    `max_doc_len`), before training rather than at each bucket's first document inside a step:
    each build stalls its rank's GPU for ~100 ms (H100: [4k, 16k]'s 33 buckets took 3.3 s), and
    under disaggregated attention the other ranks wait for it at the layer's next all-to-all.
    `prefix` (`split_tasks.cudnn_prefix()`): also the non-causal calls of pieces over a prefix, every
    query bucket over `prefix_chunk` keys (`prefix_chunks`). Returns the bucket lengths built ([]
    without buckets, SEQPAR_CUDNN_BUCKETS=0: one per length)."""
    lengths = prebuilt_lengths(heads, head_dim, torch.empty((), dtype=dtype).element_size())
    chunk = prefix_chunk(min_doc_len(heads))
    build_plans([(True, n, n) for n in lengths] + [(False, n, chunk) for n in lengths if prefix], heads, head_dim,
                dtype=dtype, device=device, scale=scale, kernels=kernels)
    return lengths


_BUILT: set = set()  # (kernels, heads, head_dim, dtype, scale, device, shape) whose plans build_plans made


def build_plans(shapes, heads: int, head_dim: int, *, dtype=torch.bfloat16, device="cuda", scale=None,
                kernels: SplitKernels | None = None) -> list[tuple[bool, int, int]]:
    """cuDNN's forward and backward plans of the dense calls (causal, query rows, key rows) that
    the split makes at `heads` query heads (cuDNN keys a plan on the shape and the scale, the
    model's being head_dim ** -0.5). torch keeps cuDNN's plans per thread, and a CUDA backward runs
    on the autograd engine's own thread (recomputed checkpointed forwards too): forward plans are
    built here, forward and backward ones again inside a backward pass. Shapes built before in this
    process are skipped; returns the ones built now."""
    scale = head_dim ** -0.5 if scale is None else scale
    kn = kernels or cudnn_triton_kernels()
    key = (kn, heads, head_dim, dtype, scale, str(device))
    todo = [s for s in dict.fromkeys(tuple(s) for s in shapes) if (*key, s) not in _BUILT]
    if not todo:
        return []

    def calls(backward: bool, shapes=todo):
        for causal, nq, nk in shapes:
            q = torch.zeros(1, nq, heads, head_dim, device=device, dtype=dtype)  # any values build the plan
            k = q if nk == nq else torch.zeros(1, nk, heads, head_dim, device=device, dtype=dtype)
            out, lse = kn.dense_fwd(q, k, k, causal, scale)
            if backward:
                kn.dense_bwd(q, q, k, k, out, lse, causal, scale)

    def build(backward: bool):
        if not _unrun(lambda: calls(backward), device, warm_up=lambda: calls(backward, [(True, 128, 128)])):
            calls(backward)

    build(backward=False)
    _RunInBackward.apply(torch.zeros((), device=device, requires_grad=True), lambda: build(backward=True)).backward()
    _BUILT.update((*key, s) for s in todo)
    return todo


_WARM: set = set()  # (thread, device) that made its cuDNN calls for real once
_CAPTURE = {"ok": os.environ.get("SEQPAR_PLAN_CAPTURE", "1") != "0"}


def _unrun(fn, device, warm_up) -> bool:
    """Runs fn's CUDA calls inside a CUDA graph capture that is then thrown away: the host does all
    it would (cuDNN builds and caches its plans), the GPU runs none of it, nor needs memory for it
    beyond the graph's pool. Built by running their calls, llama_1b's 59 buckets took 11.6-14.0 s;
    captured 10.6 s (2 H100, 2026-11-27: the host's builds, ~0.18 s a shape, are most of it). False where it
    cannot (not CUDA, SEQPAR_PLAN_CAPTURE=0, or the capture failed once: then fn runs for real).
    `warm_up()` runs for real before a thread's first capture: a thread's first cuDNN call makes
    its handle, which inside a capture invalidates it (2 H100, 2026-11-27)."""
    if not (_CAPTURE["ok"] and torch.device(device).type == "cuda"):
        return False
    if (threading.get_ident(), str(device)) not in _WARM:
        warm_up()
        _WARM.add((threading.get_ident(), str(device)))
    # not torch.cuda.graph(): it synchronises the device and empties the allocator's cache on entry
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                fn()
            finally:
                graph.capture_end()
        return True
    except RuntimeError as e:
        _CAPTURE["ok"] = False
        warnings.warn(f"seqpar: cuDNN plans cannot be built inside a CUDA graph capture here ({e}); they are "
                      "built by running their calls (GPU time)", stacklevel=2)
        return False


def prebuilt_lengths(heads: int, head_dim: int, elem: int) -> list[int]:
    """The causal square lengths `prebuild_plans` builds: every bucket from min_doc_len(heads) to
    max_doc_len ([] without buckets)."""
    per = buckets_per_octave()
    if per == 0:
        return []
    hi = max_doc_len(heads, head_dim, elem)
    lengths, n = [], min_doc_len(heads)
    while n <= hi:
        lengths.append(bucket_len(n, per))
        n = lengths[-1] + 1
    return lengths


class _RunInBackward(torch.autograd.Function):
    """Identity whose backward first calls `fn`: runs `fn` on the thread the autograd engine runs
    this device's backward passes on."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.fn = fn
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.fn()
        return grad, None


def _pad_rows(t, rows, group=1):
    """t `[1, n, H, D]` as `[1, rows, H * group, D]`: each head repeated `group` times (query head h
    reads kv head h // group), zeros after the n rows; t itself when there is nothing to do."""
    n, heads = t.shape[1], t.shape[2]
    if group == 1 and n == rows and t.is_contiguous():
        return t
    padded = t.new_empty(1, rows, heads * group, *t.shape[3:])
    padded[:, :n].unflatten(2, (heads, group)).copy_(t.unsqueeze(3))  # broadcast over the group
    padded[:, n:].zero_()
    return padded


def _rows(t, a, b, rows, group=1):
    """Rows [a, a + rows) of t (the document [a, b) and what follows it in the row) where the row
    has them, else the document padded with zeros; kv heads repeated `group` times."""
    return _pad_rows(t[:, a:a + rows] if a + rows <= t.shape[1] else t[:, a:b], rows, group)


def _padded(q, k, v, a, b, rows):
    """The long document [a, b) as dense `[1, rows, Hq, D]` q, k, v."""
    group = q.shape[2] // k.shape[2]
    return _rows(q, a, b, rows), _rows(k, a, b, rows, group), _rows(v, a, b, rows, group)


def _fold(g, group):
    return g if group == 1 else g.unflatten(2, (-1, group)).sum(3)


class _SplitAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, plan, scale, kernels):
        out, lse, state = kernels.packed_fwd(q, k, v, causal, plan.cu_q, plan.cu_k, scale)
        pad_lse = []  # per long document, the padded queries' lse (the backward's P stays finite there)
        for a, b in plan.long_docs:
            rows = plan.bucket(b - a) if causal else b - a  # without causality real queries would see the pad
            o, l = kernels.dense_fwd(*_padded(q, k, v, a, b, rows), causal, scale)
            out[:, a:b].copy_(o[:, :b - a])  # the Triton call left zeros here
            lse[:, :, a:b].copy_(l[:, :, :b - a])
            pad_lse.append(l[:, :, b - a:])
        ctx.save_for_backward(q, k, v, out, lse, *pad_lse)
        ctx.causal, ctx.plan, ctx.scale, ctx.kernels, ctx.state = causal, plan, scale, kernels, state
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *pad_lse = ctx.saved_tensors
        plan, kn, causal, scale = ctx.plan, ctx.kernels, ctx.causal, ctx.scale
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:  # cuDNN's backward takes no dlse: the whole row through Triton
            grads = kn.packed_bwd(dout, q, k, v, out, lse, causal, plan.cu_full, plan.cu_full, scale, dlse, None)
            return (*grads, None, None, None, None)
        dq, dk, dv = kn.packed_bwd(dout, q, k, v, out, lse, causal, plan.cu_q, plan.cu_k, scale, None, ctx.state)
        group = q.shape[2] // k.shape[2]
        for (a, b), l_pad in zip(plan.long_docs, pad_lse):
            n = b - a
            qp, kp, vp = _padded(q, k, v, a, b, n + l_pad.shape[-1])
            dop, op = _pad_rows(dout[:, a:b], qp.shape[1]), _rows(out, a, b, qp.shape[1])  # zero dout: no gradient
            gq, gk, gv = kn.dense_bwd(dop, qp, kp, vp, op, torch.cat([lse[:, :, a:b], l_pad], dim=2), causal, scale)
            dq[:, a:b].copy_(gq[:, :n])  # the Triton call left zeros in these rows
            dk[:, a:b] += _fold(gk[:, :n], group)  # zeros too, or a cut document's tail's share
            dv[:, a:b] += _fold(gv[:, :n], group)
        return dq, dk, dv, None, None, None, None


_HOST = WeakIdKeyDictionary()  # boundaries tensor -> (its version, its values)


def _host_bounds(cu) -> tuple:
    """The values of a boundaries tensor, read from the device once per tensor and version (or
    the host copy a caller attached as `seqpar_bounds`, as disagg's routes do)."""
    if not torch.is_tensor(cu):
        return tuple(int(x) for x in cu)
    known = getattr(cu, "seqpar_bounds", None)
    if known is not None:
        return tuple(known)
    if cu.is_inference():
        return tuple(cu.tolist())
    version, values = _HOST.get(cu, (None, None))
    if version != cu._version:
        values = tuple(cu.tolist())
        _HOST[cu] = (cu._version, values)
    return values


def flash_attn_split(q, k, v, *, causal=True, cu_seqlens, softmax_scale=None, return_lse=False, min_len=None,
                     max_len=None, per_octave=None, kernels: SplitKernels | None = None):
    """`seqpar.kernels.flash_attn` over a packed row (B = 1, shared `cu_seqlens`), long documents
    through cuDNN and the rest through one Triton call; differentiable through out (and lse).

    `min_len`, `max_len`: documents of min_len..max_len tokens go to cuDNN (default: `min_doc_len()`
    and `max_doc_len()` of these heads).
    `per_octave`: their length buckets (`bucket_len`; default `buckets_per_octave()`).
    `kernels`: the two kernels composed (default cuDNN + Triton; tests inject the reference)."""
    B, S, Hq, D = q.shape
    if B != 1 or k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or Hq % k.shape[2]:
        raise ValueError(f"split attention takes one packed row of self-attention: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} need B = 1, equal lengths, Hq % Hkv == 0")
    plan = split_plan(cu_seqlens, min_doc_len(Hq) if min_len is None else min_len, q.device,
                      buckets_per_octave() if per_octave is None else per_octave,
                      max_doc_len(Hq, D, q.element_size()) if max_len is None else max_len, causal)
    if plan.tokens != S:
        raise ValueError(f"cu_seqlens ends at {plan.tokens}, the row has {S} tokens")
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    out, lse = _SplitAttn.apply(q, k, v, bool(causal), plan, scale, kernels or cudnn_triton_kernels())
    return (out, lse) if return_lse else out
