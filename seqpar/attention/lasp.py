"""Linear attention over the cp group: LASP-2 (Sun et al., 2025), memory states instead of tokens.

Decayed linear attention carries a fixed-size memory state M (H x Dk x Dv) along the sequence, so
a rank needs from the ranks before it only their chunks' states, not their tokens. Per local chunk:

    out = intra(q, k, v)                          (the chunk on its own, from zero state)
        + scale * exp(log_decay * (t + 1)) q_t I   (t in the chunk's first document only)

where I, the state entering the chunk, comes from an exact scan of the chunks' own states
S = sum_s exp(log_decay * (C - 1 - s)) k_s^T v_s (over the chunk's last document) in chunk order
(`state_scan`). A document that starts at or inside a chunk stops the carried state there.

Two schedules of the same math:
- serial (what `lasp2_attention` runs): the kernel itself exchanges the states (`_ChunkExchange`,
  the lightning kernel's `exchange` hook): its first pass over k, v yields every S, the scan runs,
  and its output pass starts from I; backward mirrors it with the gradients of I and S. Nothing
  is computed twice; the exchange (a few MiB) is exposed. LASP-1 (`lasp1.py`) is this schedule
  with an unblocked P2P chain.
- overlapped (`overlap=True`, `_Overlapped`): S by a separate pass, the scan posted, the kernel
  from zero while it flies, then the readout q.I; backward: dI, the reverse scan posted, the
  kernel's backward while it flies, dS's share of dk, dv. It hides the exchange behind extra
  passes over the chunk: the choice for links slower than NVLink.
With `zigzag` a rank's two chunks go into the same single scan.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from seqpar import kernels
from seqpar.attention.state_scan import SCANS, ChunkChain, start_scan
from seqpar.parallel.sharding import chunk_order, group_size_rank, host_bounds

_HALF = (torch.float16, torch.bfloat16)


def lasp2_attention(q, k, v, *, log_decay, group=None, cu_seqlens=None, scale=None, layout="contiguous",
                    scan="allgather"):
    """`scan` is `parallel.linear_scan`: `allgather` (LASP-2's one all-gather) or `pipelined` (a chain)."""
    if scan not in SCANS:
        raise ValueError(f"lasp2_attention: scan={scan!r}; choose one of {SCANS}")
    # serial: on 2 H100 (docs/benchmarks, 2026-11-25) even the unfused serial schedule ran at 2x
    # the overlapped one's efficiency (0.67 vs 0.33 at 256k tokens): over NVLink the exchange of
    # a few MiB costs less than the passes that hide it.
    return lasp_attention(q, k, v, log_decay, group=group, cu_seqlens=cu_seqlens, scale=scale, layout=layout,
                          scan=scan, overlap=False)


def lasp_attention(q, k, v, log_decay, *, group, cu_seqlens, scale, layout, scan, overlap):
    """The machinery LASP-1 and LASP-2 share; `overlap` picks the schedule (module docstring)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if log_decay.requires_grad:
        raise ValueError("lasp: log_decay is a fixed per-head constant here; pass a tensor without requires_grad")
    world, rank = group_size_rank(group)
    bounds = None if cu_seqlens is None else host_bounds(cu_seqlens)
    geo = _cut(world, rank, *q.shape[:2], layout, bounds, q.device, torch.promote_types(q.dtype, torch.float32))
    chain = _chain(geo, rank, log_decay)
    if overlap:
        return _Overlapped.apply(q, k, v, log_decay, geo, chain, scale, group, scan)
    return _kernel(q, k, v, log_decay, scale, geo, exchange=_ChunkExchange(geo, chain, group, scan))


_CHAINS = WeakIdKeyDictionary()  # log_decay -> {id(geometry): (geometry, log_decay's version, chain)}


def _chain(geo, rank, log_decay) -> ChunkChain:
    """The chain of a geometry under a layer's decays, built once per (geometry, decay tensor and
    version): the layer's later calls reuse its carry and its gather weights (no launches)."""
    def build():
        # a_g: how much of the state entering chunk g survives it (0 where a document starts in it)
        carry = torch.exp(log_decay.to(geo.dtype) * geo.chunk_len)[None, :] * geo.passes[:, None]
        return ChunkChain(geo.owners, carry, rank, geo.starts, geo.chunk_continues)

    if log_decay.is_inference():  # (no version to check)
        return build()
    known = _CHAINS.setdefault(log_decay, {})
    hit = known.get(id(geo))
    if hit is None or hit[0] is not geo or hit[1] != log_decay._version:
        hit = known[id(geo)] = (geo, log_decay._version, build())
        if len(known) > 8:  # packed rows bring new geometries: keep the latest few
            del known[next(iter(known))]
    return hit[2]


@dataclass(frozen=True)
class _Geometry:
    """How this rank's local chunks sit in the global sequence; depends on shapes and boundaries only."""
    chunk_len: int
    n_local: int
    dtype: torch.dtype  # states and their merges: fp32, fp64 for fp64 inputs
    owners: list[tuple[int, int]]  # global chunk -> (rank, its slot among that rank's chunks)
    passes: torch.Tensor  # [n_chunks]: 1 where the carried state crosses the chunk, 0 where a document starts
    starts: tuple[bool, ...]  # per global chunk, on the host: a document starts in it (passes == 0)
    chunk_continues: tuple[bool, ...]  # per global chunk: its first token continues the previous chunk's document
    continues: list[bool]  # per local chunk: its first token continues a document of the previous chunk
    keep: torch.Tensor  # the same as a [n_local, 1, 1, 1, 1] mask
    first_len: list[int]  # per local chunk: tokens before its first inner document start (read the entering state)
    last_start: list[int]  # per local chunk: offset of its last inner document start (feed its own state)
    kernel_cu: torch.Tensor | None  # local document boundaries for the intra-chunk kernel (packed rows)
    first_slot: torch.Tensor  # [n_local, B]: the kernel's state slot of each chunk's first document
    last_slot: torch.Tensor  # [n_local, B]: ... and of its last document
    n_slots: int


@functools.lru_cache(maxsize=64)  # every layer of a step asks for the same one: no rebuild, no host-to-device copy
def _cut(world, rank, B, s_local, layout, bounds, device, dt) -> _Geometry:
    order = chunk_order(world, layout)
    n_local = len(order[0])
    if s_local % n_local:
        raise ValueError(f"lasp: local length {s_local} does not split into {n_local} chunks (layout={layout})")
    C = s_local // n_local
    n_chunks = world * n_local
    if bounds is None:
        starts = [0]  # each row is one document
    else:
        if B != 1:
            raise ValueError(f"lasp: packed documents (cu_seqlens) need batch size 1, got a batch of {B}")
        if bounds[0] != 0 or bounds[-1] != C * n_chunks:
            raise ValueError(f"lasp: cu_seqlens must run from 0 to the global length {C * n_chunks}, got {list(bounds)}")
        starts = sorted(set(bounds[:-1]))
    inside = [[s - g * C for s in starts if g * C < s < (g + 1) * C] for g in range(n_chunks)]
    at_start = [g * C in starts for g in range(n_chunks)]

    owners = [None] * n_chunks
    for r, chunks in enumerate(order):
        for i, g in enumerate(chunks):
            owners[g] = (r, i)
    resets = tuple(at_start[g] or bool(inside[g]) for g in range(n_chunks))  # a document starts in chunk g
    passes = torch.tensor([not r for r in resets], dtype=dt, device=device)
    mine = order[rank]
    continues = [not at_start[g] for g in mine]
    keep = torch.tensor(continues, dtype=dt, device=device).view(-1, 1, 1, 1, 1)
    if bounds is None:  # the kernel sees B * n_local rows, row b * n_local + i is chunk i of row b
        kernel_cu = None
        first_slot = last_slot = torch.arange(B * n_local, device=device).view(B, n_local).T
        n_slots = B * n_local
    else:
        edges = sorted({i * C for i in range(n_local + 1)} | {i * C + s for i, g in enumerate(mine) for s in inside[g]})
        kernel_cu = torch.tensor(edges, dtype=torch.int32, device=device)
        first_slot = torch.tensor([[edges.index(i * C)] for i in range(n_local)], device=device)
        last_slot = torch.tensor([[edges.index((i + 1) * C) - 1] for i in range(n_local)], device=device)
        n_slots = len(edges) - 1
    return _Geometry(C, n_local, dt, owners, passes, resets, tuple(not a for a in at_start), continues, keep,
                     first_len=[inside[g][0] if inside[g] else C for g in mine],
                     last_start=[inside[g][-1] if inside[g] else 0 for g in mine], kernel_cu=kernel_cu,
                     first_slot=first_slot, last_slot=last_slot, n_slots=n_slots)


class _ChunkExchange:
    """The lightning kernel's exchange hook for the serial schedule: the kernel hands over the own
    (exit) state of every document slot of the local chunks, computed from zero; the chunks' own
    states S (their last slots) go into the cp scan; the entering states I come back into the
    chunks' first slots. Backward: d(entering) of the first slots -> reverse scan -> dS into the
    last slots, which the kernel takes as the gradient of those documents' exit states."""

    def __init__(self, geo, chain, group, scan):
        self.geo, self.chain, self.group, self.scan = geo, chain, group, scan

    def forward(self, own):
        geo = self.geo
        states = _chunk_states(own.to(geo.dtype), geo, geo.last_slot)
        pending = start_scan(self.scan, states, self.chain, self.group)
        return _Then(pending, lambda entering: _to_slots(entering * geo.keep, geo, geo.first_slot),
                     self.chain.receives(False))

    def backward(self, d_initial):
        geo = self.geo
        d_entering = _chunk_states(d_initial.to(geo.dtype), geo, geo.first_slot) * geo.keep
        pending = start_scan(self.scan, d_entering, self.chain, self.group, reverse=True)
        return _Then(pending, lambda d_states: _to_slots(d_states, geo, geo.last_slot), self.chain.receives(True))


class _Then:
    """A posted scan and what to do with its answer. Where this rank's chunks receive nothing
    (`ChunkChain.receives`), `wait` gives None (the kernel then starts every document from zero,
    no fold of zeros) once the collective has ended. It ended only after the kernel's passes when
    `settle` came after them (6619ad8): this rank's NCCL kernel, queued behind passes that take
    every SM, held the other ranks back (2 H100, 2 ranks, contiguous, 256k tokens: LASP-2 12.98 ms
    per layer against 10.9-11.2 ms when every rank waited first, 2026-11-26 ninth session)."""

    def __init__(self, pending, then, receives):
        self.pending, self.then, self.receives = pending, then, receives

    def wait(self):
        if self.receives:
            return self.then(self.pending.wait())
        self.pending.settle()
        return None


class _Overlapped(torch.autograd.Function):
    """The overlapped schedule: the exchange flies while the kernel runs the chunks from zero state;
    the readout q.I, dI, the readout's dq and dS's share of dk, dv are separate passes over the chunk."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, geo, chain, scale, group, scan):
        with torch.autocast(q.device.type, enabled=False):
            lam = log_decay.to(geo.dtype)
            states = torch.stack([_outer_sum(*_segments(geo, i, "last", k, v), _state_decay(lam, geo, i), geo.dtype)
                                  for i in range(geo.n_local)])
            pending = start_scan(scan, states, chain, group)
            # The kernel's graph is kept (not recomputed in backward): its backward is the kernel's own.
            needs = ctx.needs_input_grad[:3]
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            with torch.enable_grad() if any(needs) else nullcontext():
                intra = _kernel(*leaves, log_decay, scale, geo)
            entering = pending.wait()  # read only by chunks that continue a document
            # The readout goes into the kernel's output buffer, which `intra` (kept for the
            # backward) shares: a second buffer would hold one more activation per layer. Hiding
            # the write from autograd is sound because lightning attention's backward never reads
            # its output (neither the reference nor the Triton kernel saves it).
            out = intra.detach()
            out = out if out.is_contiguous() else out.contiguous()  # segments below must be views
            with torch.autograd._unsafe_preserve_version_counter(out):
                for i in _continuing(geo):
                    q_seg, o_seg = _segments(geo, i, "first", q, out)
                    o_seg += _apply_state(q_seg, entering[i], scale * _entry_decay(lam, geo, i))
        ctx.save_for_backward(q, k, v, lam, entering)
        ctx.geo, ctx.chain, ctx.scale, ctx.group, ctx.scan = geo, chain, scale, group, scan
        ctx.intra, ctx.leaves = intra, leaves
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, lam, entering = ctx.saved_tensors
        geo, scale = ctx.geo, ctx.scale
        intra, leaves = ctx.intra, ctx.leaves
        del ctx.intra, ctx.leaves
        dout = dout.contiguous()
        d_entering = torch.zeros_like(entering)
        for i in _continuing(geo):
            d_entering[i] = _outer_sum(*_segments(geo, i, "first", q, dout), scale * _entry_decay(lam, geo, i),
                                       geo.dtype)
        # every rank joins the reverse scan, whichever of q, k, v it needs gradients for
        pending = start_scan(ctx.scan, d_entering, ctx.chain, ctx.group, reverse=True)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(intra, wanted, dout) if wanted else ())
        dq, dk, dv = (next(grads).contiguous() if leaf.requires_grad else None for leaf in leaves)
        if dq is not None:
            for i in _continuing(geo):
                do_seg, dq_seg = _segments(geo, i, "first", dout, dq)
                dq_seg += _apply_state(do_seg, entering[i].transpose(-1, -2), scale * _entry_decay(lam, geo, i))
        d_states = pending.wait()  # gradient of each local chunk's own state S
        for i in range(geo.n_local):
            u = _state_decay(lam, geo, i)
            k_seg, v_seg = _segments(geo, i, "last", k, v)
            if dk is not None:
                _segments(geo, i, "last", dk)[0].add_(_apply_state(v_seg, d_states[i].transpose(-1, -2), u))
            if dv is not None:
                _segments(geo, i, "last", dv)[0].add_(_apply_state(k_seg, d_states[i], u))
        return dq, dk, dv, None, None, None, None, None, None


def _continuing(geo):
    return [i for i in range(geo.n_local) if geo.continues[i]]


def _kernel(q, k, v, log_decay, scale, geo, exchange=None):
    """Every local chunk's output in one kernel call, from zero state or through `exchange`."""
    if geo.kernel_cu is not None:  # one packed row: chunk edges count as document edges
        return kernels.lightning_attn(q, k, v, log_decay, scale=scale, cu_seqlens=geo.kernel_cu, exchange=exchange)[0]
    B, S = q.shape[:2]
    rows = [t.reshape(B * geo.n_local, geo.chunk_len, *t.shape[2:]) for t in (q, k, v)]
    o = kernels.lightning_attn(*rows, log_decay, scale=scale, exchange=exchange)[0]
    return o.reshape(B, S, *o.shape[2:])


def _chunk_states(states, geo, slots):
    """The kernel's per-document states `[n_slots, H, Dk, Dv]` at `slots` as per-chunk states
    `[n_local, B, H, Dk, Dv]`; the inverse of `_to_slots`."""
    if geo.kernel_cu is None:  # rows without documents: slot b * n_local + i is chunk i of row b (a view)
        return states.unflatten(0, (-1, geo.n_local)).transpose(0, 1)
    return states[slots]


def _to_slots(x, geo, slots):
    """Per-chunk states `[n_local, B, H, Dk, Dv]` into the kernel's per-document slots (zero elsewhere)."""
    if geo.kernel_cu is None:
        return x.transpose(0, 1).flatten(0, 1)
    out = x.new_zeros(geo.n_slots, *x.shape[2:])
    return out.index_copy_(0, slots.flatten(), x.flatten(0, 1))


def _segments(geo, i, which, *xs):
    """Views of local chunk i's tokens that read the entering state ("first") or feed its own ("last")."""
    lo, hi = (0, geo.first_len[i]) if which == "first" else (geo.last_start[i], geo.chunk_len)
    return [x.unflatten(1, (geo.n_local, geo.chunk_len))[:, i, lo:hi] for x in xs]


def _entry_decay(lam, geo, i):
    """[T, H]: exp(log_decay * (t + 1)), how much of the entering state token t of the chunk sees."""
    t = torch.arange(1, geo.first_len[i] + 1, device=lam.device, dtype=lam.dtype)
    return torch.exp(t[:, None] * lam[None, :])


def _state_decay(lam, geo, i):
    """[T, H]: exp(log_decay * (C - 1 - s)), the weight of token s in the state leaving the chunk."""
    s = torch.arange(geo.last_start[i], geo.chunk_len, device=lam.device, dtype=lam.dtype)
    return torch.exp((geo.chunk_len - 1 - s)[:, None] * lam[None, :])


def _outer_sum(a, b, w, dtype):
    """sum_t w[t, h] a[:, t, h]^T b[:, t, h] -> [B, H, Da, Db] in `dtype` (fp32 accumulation and result)."""
    aw = a * w.to(a.dtype)[None, :, :, None]
    if a.is_cuda and a.dtype in _HALF and _has_bmm_out_dtype():
        # fp32 out of 16-bit operands: no fp32 copy of a chunk's keys and values (GBs at 512k tokens)
        B, T, H, Da = a.shape
        out = torch.bmm(aw.permute(0, 2, 3, 1).reshape(B * H, Da, T), b.permute(0, 2, 1, 3).reshape(B * H, T, -1),
                        out_dtype=torch.float32)
        return out.view(B, H, Da, -1)
    return torch.einsum("bthd,bthe->bhde", aw.to(dtype), b.to(dtype))


@functools.lru_cache(maxsize=None)
def _has_bmm_out_dtype() -> bool:
    x = torch.zeros(1, 1, 1, dtype=torch.bfloat16, device="cuda")
    try:
        return torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _apply_state(x, state, w):
    """w[t, h] * x[:, t, h] @ state[:, h] -> [B, T, H, De] in x's dtype."""
    return torch.einsum("bthd,bhde->bthe", x, state.to(x.dtype)) * w.to(x.dtype)[None, :, :, None]
