"""Attention through cuDNN's graph API (the `nvidia-cudnn-frontend` package, `import cudnn`): a
whole packed row in ONE call, query and key boundaries of their own, causal aligned bottom-right.

torch's cuDNN attention runs one dense shape per call and aligns a causal mask top-left, so packed
rows went to cuDNN document by document (the split) and pieces over a prefix (disagg's servers,
the ring's prefix calls) to seqpar's Triton kernel. cuDNN's own graphs take packed rows (THD:
ragged offsets and per-document lengths) and a bottom-right causal mask. On one H100 (2026-11-28,
docs/benchmarks/cudnn_fe_probe_gpu.py, call 5), fwd / bwd ms against the Triton kernel: a piece of 8k
queries over 56k keys at llama_1b's heads (32/8 x 64) 7.96 / 22.9 against 9.48 / 31.4; 2k over 30k
1.07 / 3.18 against 1.81 / 5.39; a packed lognormal 16k row at 32 x 128 2.23 / 6.51 (the split:
9.72 fwd+bwd, FlexAttention with a document mask 11.1).

A graph is built per geometry (document slots, longest query and key run, heads, head dim,
causality, dtype, direction; the backward also the token totals, which size its workspace):
0.11-0.18 s of host time each on an H100 (call 6), so the counts and lengths are bucketed (slots
to a power of two, lengths as `split.bucket_len`) and the graphs cached; padded slots have length 0.
Documents with as many queries as keys get the top-left causal mask (the same mask; cuDNN's
backward ran 1.8x longer with the bottom-right one). The lse is seqpar's `[1, Hq, Tq]` (natural log, -inf for a
row without a visible key); cuDNN's stats are per document slot `[docs, Hq, S_max, 1]`, gathered and
scattered through an index built once per boundaries.

`SEQPAR_ATTN_KERNEL=graph` sends flash_attn / flash_attn_backward calls it takes here
(kernels/dispatch.py); `available()` says whether the frontend imports and runs on this device.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch

from seqpar.kernels.flash_attn.split import _host_bounds, bucket_len, scratch_bytes

HEAD_DIMS = (64, 128)
_DTYPES = (torch.float16, torch.bfloat16)
# Length buckets per doubling (SEQPAR_CUDNN_GRAPH_BUCKETS, a power of two). The lengths a graph is
# built for only bound the real ones (the kernels run each document's own length, the padding mask
# skips the rest): a coarse bucket costs empty tiles in the grid and a larger stats buffer, a fine
# one more graphs to build (0.11-0.18 s each: every new geometry stalls its step).
PER_OCTAVE = 4
BUCKETS_ENV = "SEQPAR_CUDNN_GRAPH_BUCKETS"


def buckets_per_octave() -> int:
    raw = os.environ.get(BUCKETS_ENV, "").strip()
    if not raw:
        return PER_OCTAVE
    if not raw.isdigit() or int(raw) < 1 or int(raw) & (int(raw) - 1):
        raise ValueError(f"{BUCKETS_ENV}={raw!r}: need a power of two (length buckets per doubling, default "
                         f"{PER_OCTAVE})")
    return int(raw)


_LOCK = threading.Lock()  # one handle per device, its stream set per call (forward and autograd threads)


@lru_cache(maxsize=None)
def _frontend():
    """The `cudnn` module, or None where it does not import or has no backend to run on."""
    try:
        import cudnn
        cudnn.backend_version()
    except Exception:  # not installed, or no libcudnn / driver: the family is simply not offered
        return None
    return cudnn


def available() -> bool:
    return torch.cuda.is_available() and _frontend() is not None


# cuDNN's per-slot stats hold slots x longest query run rows per head: past this many times the row's
# own tokens (one long document among hundreds of short ones) the call goes elsewhere
MAX_STATS_WASTE = 8


def applies(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, **_) -> bool:
    """Whether this family takes the call (CUDA, fp16/bf16, head dim 64 or 128, element offsets
    within int32; B = 1 for rows given by boundaries, dense [B, S, H, D] rows count as B documents;
    the backward's dQ accumulator within SEQPAR_CUDNN_SCRATCH_MB; per-slot stats within
    MAX_STATS_WASTE x the tokens)."""
    if not (q.is_cuda and q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] in HEAD_DIMS and v.shape[-1] == q.shape[-1] and q.shape[2] % k.shape[2] == 0
            and max(q.numel(), k.numel()) < 2 ** 31 and available()):
        return False
    cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
    if cu_q is not None and q.shape[0] != 1:
        return False
    return fits(_layout_of(q, k, cu_q, cu_k, causal), q.shape[2] * q.shape[3], gqa=k.shape[2] != q.shape[2])


def fits(lay: Layout, query_width: int, gqa: bool = False) -> bool:
    """Whether a call's cuDNN buffers stay bounded: the per-slot stats within MAX_STATS_WASTE x the
    row's query tokens, and the backward's workspace (`backward_workspace`) within
    SEQPAR_CUDNN_SCRATCH_MB, as the split's calls are."""
    tokens = lay.rows.numel()
    return (lay.docs * lay.max_q <= MAX_STATS_WASTE * max(tokens, 1)
            and backward_workspace(lay, query_width, gqa) <= scratch_bytes())


def backward_workspace(lay: Layout, query_width: int, gqa: bool) -> int:
    """Bytes of the backward's workspace: an fp32 dQ accumulator over the bucketed query tokens
    (`query_width` = query heads x head dim), and with GQA fp32 dK and dV at the query heads' width
    over the bucketed key tokens, reduced to the key heads afterwards. Measured on an H100 (cuDNN 9.19,
    2026-11-28-gpu-22nd/call1 build.json and plans.json) within 0.6% of the graphs' own figure: 32/8 x 64
    with 32k/32k tokens 809.5 MB (805 here), 10k/64k 1.162 GB (1.158), 64k/1M 17.73 GB (17.72); MHA
    32 x 128, 16k tokens 274.7 MB (268.4). A 1M-token row of 32 x 128 would take 16 GiB, a server's
    30 pieces over 30k-token prefixes with GQA 17 GB."""
    keys = 2 * lay.total_k if gqa else 0
    return 4 * query_width * (lay.total_q + keys)


@lru_cache(maxsize=None)
def _handle(device_index: int):
    cudnn = _frontend()
    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@dataclass(frozen=True)
class Layout:
    """A row's documents as cuDNN sees them: slot i holds document i (length 0 past the real ones)."""
    docs: int  # slots, a power of two
    max_q: int  # the longest query run, bucketed
    max_k: int
    total_q: int  # all query tokens, bucketed (sizes the backward's workspace by tokens, not slots x max_q)
    total_k: int
    q_off: torch.Tensor  # [docs + 1] int32 token offsets of each slot's queries (padded slots: the end)
    k_off: torch.Tensor
    q_len: torch.Tensor  # [docs] int32
    k_len: torch.Tensor
    rows: torch.Tensor  # [Tq] int64: token t's position in the stats, slot * max_q + offset in its document
    blind: torch.Tensor | None  # int64 query rows that see no key (causal, more queries than keys), or None
    causal: bool
    square: bool  # every document has as many queries as keys (top-left alignment is then the same mask)


def layout(bounds_q: tuple, bounds_k: tuple, causal: bool, device) -> Layout:
    return _layout(tuple(bounds_q), tuple(bounds_k), bool(causal), torch.device(device), buckets_per_octave())


@lru_cache(maxsize=32)  # every layer of a step passes the same boundaries; each holds a [Tq] index
def _layout(bq: tuple, bk: tuple, causal: bool, device, per_octave: int) -> Layout:
    if len(bq) != len(bk) or len(bq) < 2:
        raise ValueError(f"cudnn_graph: query and key boundaries must list the same documents, got {len(bq) - 1} "
                         f"and {len(bk) - 1}")
    if bq[0] != 0 or bk[0] != 0:
        raise ValueError(f"cudnn_graph: boundaries must start at 0, got {bq[0]} (queries) and {bk[0]} (keys)")
    lq = [b - a for a, b in zip(bq, bq[1:])]
    lk = [b - a for a, b in zip(bk, bk[1:])]
    docs = 1 << (len(lq) - 1).bit_length()
    max_q = bucket_len(max(max(lq), 1), per_octave)
    max_k = bucket_len(max(max(lk), 1), per_octave)
    pad = docs - len(lq)
    as_dev = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    # token t of document i sits at stats row i * max_q + (t - start of i): built on the host with
    # torch (a list of a million positions takes ~0.1 s of Python), once per boundaries
    doc = torch.repeat_interleave(torch.arange(len(lq)), torch.tensor(lq))
    rows = doc * max_q + torch.arange(bq[-1]) - torch.tensor(bq[:-1])[doc]
    blind = [t for a, n, m in zip(bq, lq, lk) if m == 0 or (causal and n > m)  # bottom-right: the first n - m
             for t in range(a, a + (n if m == 0 else n - m))]                 # queries see no key
    total_q, total_k = (bucket_len(max(b[-1], 1), per_octave) for b in (bq, bk))
    return Layout(docs, max_q, max_k, total_q, total_k, as_dev(list(bq) + [bq[-1]] * pad),
                  as_dev(list(bk) + [bk[-1]] * pad), as_dev(lq + [0] * pad), as_dev(lk + [0] * pad), rows.to(device),
                  torch.tensor(blind, dtype=torch.int64, device=device) if blind else None, causal, lq == lk)


def _stride(s, h, d):
    return [s * h * d, d, h * d, 1]  # dims [B, H, S, D] over seqpar's [B, S, H, D] memory


@lru_cache(maxsize=256)
def _graph(backward: bool, docs: int, max_q: int, max_k: int, hq: int, hkv: int, d: int, causal: bool,
           scale: float, dtype: torch.dtype, device_index: int, square: bool = False, totals: tuple = ()):
    """(graph, its tensors by name, workspace bytes) of one direction and geometry, built once.

    `square`: causal documents with as many queries as keys get the top-left mask (the same mask):
    cuDNN's backward with the bottom-right one ran a packed 16k row 1.8x slower on an H100
    (2026-11-28 call 6 against call 5's probe). `totals` (backward): the bucketed query and key
    token counts, which size the backward's workspace by the tokens there are rather than slots x
    longest run (8.6 GB for 30 pieces of 2k queries over 30k keys at 32/8 x 64 without, call 6)."""
    geometry = (backward, docs, max_q, max_k, hq, hkv, d, causal, scale, dtype, device_index, square)
    if totals:
        try:
            return _build(*geometry, totals)
        except Exception as e:  # a frontend or backend without the packed totals: the padded workspace
            warnings.warn(f"cudnn_graph: the backward's max_total_seq_len was refused ({e!r:.200}); "
                          "its workspace is sized by slots x the longest run", stacklevel=2)
    return _build(*geometry, ())


_BUILT = {"count": 0, "seconds": 0.0}  # every graph built in this process (the lru caches are per geometry)


def _build(*geometry):
    t0 = time.perf_counter()
    g, t = _declare(*geometry)
    cudnn = _frontend()
    g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    _BUILT["count"] += 1
    _BUILT["seconds"] += time.perf_counter() - t0
    return g, t, g.get_workspace_size()


def build_stats() -> dict:
    """Graphs built so far and the host seconds they took, for the step metrics (empty before the
    first): a count that still grows late in a run is a stall in every step that builds one."""
    if not _BUILT["count"]:
        return {}
    return {"attn_graph_builds": _BUILT["count"], "attn_graph_build_s": round(_BUILT["seconds"], 3)}


def _declare(backward, docs, max_q, max_k, hq, hkv, d, causal, scale, dtype, device_index, square, totals):
    """The graph of one direction and geometry, declared, not built: (graph, its tensors by name)."""
    cudnn = _frontend()
    io = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
    f32, i32 = cudnn.data_type.FLOAT, cudnn.data_type.INT32
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32,
                      handle=_handle(device_index))
    meta = lambda name, n: g.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)  # noqa: E731
    t = dict(q_off=meta("q_off", docs + 1), k_off=meta("k_off", docs + 1), q_len=meta("q_len", docs),
             k_len=meta("k_len", docs))

    def tokens(name, h, s, off):
        return g.tensor(name=name, dim=[docs, h, s, d], stride=_stride(s, h, d), data_type=io, ragged_offset=off)

    t.update(q=tokens("q", hq, max_q, t["q_off"]), k=tokens("k", hkv, max_k, t["k_off"]),
             v=tokens("v", hkv, max_k, t["k_off"]))
    mask = dict(use_padding_mask=True, seq_len_q=t["q_len"], seq_len_kv=t["k_len"], attn_scale=scale,
                **({} if not causal else dict(use_causal_mask=True) if square else dict(use_causal_mask_bottom_right=True)))
    if not backward:
        try:
            o, stats = g.sdpa(t["q"], t["k"], t["v"], name="sdpa", generate_stats=True, **mask)
        except TypeError:  # frontends before generate_stats
            o, stats = g.sdpa(t["q"], t["k"], t["v"], name="sdpa", is_inference=False, **mask)
        o.set_output(True).set_dim([docs, hq, max_q, d]).set_stride(_stride(max_q, hq, d)).set_ragged_offset(t["q_off"])
        stats.set_output(True).set_data_type(f32).set_dim([docs, hq, max_q, 1]).set_stride([hq * max_q, max_q, 1, 1])
        t.update(o=o, stats=stats)
    else:
        t.update(o=tokens("o", hq, max_q, t["q_off"]), dO=tokens("dO", hq, max_q, t["q_off"]),
                 stats=g.tensor(name="stats", dim=[docs, hq, max_q, 1], stride=[hq * max_q, max_q, 1, 1],
                                data_type=f32))
        sizes = dict(max_total_seq_len_q=totals[0], max_total_seq_len_kv=totals[1]) if totals else {}
        grads = g.sdpa_backward(t["q"], t["k"], t["v"], t["o"], t["dO"], t["stats"], name="sdpa_backward", **sizes,
                                **mask)
        for name, x, h, s, off in zip(("dQ", "dK", "dV"), grads, (hq, hkv, hkv), (max_q, max_k, max_k),
                                      (t["q_off"], t["k_off"], t["k_off"])):
            x.set_output(True).set_dim([docs, h, s, d]).set_stride(_stride(s, h, d)).set_ragged_offset(off)
            t[name] = x
    return g, t


def _run(backward, lay: Layout, q, k, bufs: dict, scale: float):
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    g, t, ws = _graph(backward, lay.docs, lay.max_q, lay.max_k, hq, hkv, d, lay.causal, float(scale), q.dtype, index,
                      lay.square, (lay.total_q, lay.total_k) if backward else ())
    feed = _feed(lay, t, q, k, bufs)
    workspace = torch.empty(max(ws, 1), dtype=torch.uint8, device=q.device)
    cudnn = _frontend()
    with _LOCK:
        handle = _handle(index)
        cudnn.set_stream(handle, torch.cuda.current_stream(q.device).cuda_stream)
        g.execute(feed, workspace, handle=handle)


def _feed(lay: Layout, t: dict, q, k, bufs: dict) -> dict:
    """A graph's tensors -> this call's data: the layout's offsets (in elements) and lengths, and `bufs`."""
    hd_q, hd_k = q.shape[2] * q.shape[3], k.shape[2] * k.shape[3]
    feed = {t["q_off"]: (lay.q_off * hd_q).view(-1, 1, 1, 1), t["k_off"]: (lay.k_off * hd_k).view(-1, 1, 1, 1),
            t["q_len"]: lay.q_len.view(-1, 1, 1, 1), t["k_len"]: lay.k_len.view(-1, 1, 1, 1)}
    feed.update({t[name]: x for name, x in bufs.items()})
    return feed


def _layout_of(q, k, cu_seqlens_q, cu_seqlens_k, causal) -> Layout:
    if cu_seqlens_q is None:  # dense rows: each of the B rows is a document
        B, Sq, Sk = q.shape[0], q.shape[1], k.shape[1]
        bq, bk = tuple(range(0, B * Sq + 1, Sq)), tuple(range(0, B * Sk + 1, Sk))
    else:
        if q.shape[0] != 1:
            raise ValueError(f"cudnn_graph: packed documents need batch size 1, got q of shape {tuple(q.shape)}")
        host = lambda cu: _host_bounds(cu) if isinstance(cu, torch.Tensor) else tuple(cu)  # noqa: E731
        bq, bk = host(cu_seqlens_q), host(cu_seqlens_k)
        if bq[-1] != q.shape[1] or bk[-1] != k.shape[1]:
            raise ValueError(f"cudnn_graph: boundaries must end at the rows' lengths ({q.shape[1]} queries, "
                             f"{k.shape[1]} keys), got {bq[-1]} and {bk[-1]}")
    return layout(bq, bk, causal, q.device)


def attention_forward(q, k, v, *, causal=True, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None):
    """(out `[B, Sq, Hq, D]`, lse `[B, Hq, Sq]` fp32) as seqpar's flash_attn contract has them."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    lay = _layout_of(q, k, cu_seqlens_q, cu_seqlens_k, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty_like(q)
    stats = torch.empty(lay.docs, q.shape[2], lay.max_q, 1, dtype=torch.float32, device=q.device)
    _run(False, lay, q, k, dict(q=q, k=k, v=v, o=out, stats=stats), scale)
    if lay.blind is not None:  # rows that see no key: out 0 (and lse -inf), the reference's contract
        out.view(-1, *out.shape[2:]).index_fill_(0, lay.blind, 0)
    return out, lse_from_stats(stats, lay, q.shape[0], q.shape[1])


def lse_from_stats(stats, lay: Layout, B: int, Sq: int):
    """cuDNN's stats `[docs, Hq, max_q, 1]` as seqpar's lse `[B, Hq, Sq]` (-inf on blind rows)."""
    Hq = stats.shape[1]
    lse = stats.view(lay.docs, Hq, lay.max_q).transpose(0, 1).reshape(Hq, -1).index_select(1, lay.rows)
    if lay.blind is not None:
        lse.index_fill_(1, lay.blind, float("-inf"))
    return lse.view(Hq, B, Sq).transpose(0, 1).contiguous()


def stats_from_lse(lse, lay: Layout):
    """seqpar's lse `[B, Hq, Sq]` as cuDNN's stats `[docs, Hq, max_q, 1]`; a row without a visible
    key has every score masked, so any finite value gives it P = 0: -inf becomes 0."""
    Hq = lse.shape[1]
    flat = lse.float().transpose(0, 1).reshape(Hq, -1)
    flat = torch.where(torch.isfinite(flat), flat, torch.zeros_like(flat))
    stats = torch.zeros(Hq, lay.docs * lay.max_q, dtype=torch.float32, device=lse.device)
    stats.index_copy_(1, lay.rows, flat)
    return stats.view(Hq, lay.docs, lay.max_q).transpose(0, 1).contiguous().unsqueeze(-1)


def attention_backward(dout, q, k, v, out, lse, *, causal=True, cu_seqlens_q=None, cu_seqlens_k=None,
                       softmax_scale=None):
    """(dq, dk, dv) from (out, lse), which may be the merged ones of a larger attention."""
    dout, q, k, v, out = (t.contiguous() for t in (dout, q, k, v, out))
    lay = _layout_of(q, k, cu_seqlens_q, cu_seqlens_k, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    stats = stats_from_lse(lse, lay)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _run(True, lay, q, k, dict(q=q, k=k, v=v, o=out, dO=dout, stats=stats, dQ=dq, dK=dk, dV=dv), scale)
    if lay.blind is not None:
        dq.view(-1, *dq.shape[2:]).index_fill_(0, lay.blind, 0)
    return dq, dk, dv


class GraphAttn(torch.autograd.Function):
    """flash_attn through this family, differentiable through out (and lse: with a gradient on the
    lse the backward runs seqpar's Triton kernel, which takes one; cuDNN's backward does not)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, cu_q, cu_k, scale):
        out, lse = attention_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softmax_scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, cu_q, cu_k, scale)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        causal, cu_q, cu_k, scale = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None:
            from seqpar.kernels.flash_attn import triton as ft
            grads = ft.attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          softmax_scale=scale, dlse=dlse)
        else:
            grads = attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                       softmax_scale=scale)
        return (*grads, None, None, None, None)
