"""Linear attention over the cp group: LASP-2 (Sun et al., 2025), memory states instead of tokens.

Decayed linear attention carries a fixed-size memory state M (H x Dk x Dv) along the sequence, so
a rank needs from the ranks before it only their chunks' states, not their tokens. Per local chunk:

    out = intra(q, k, v)                          (the chunk on its own, from zero state)
        + scale * exp(log_decay * (t + 1)) q_t I   (t in the chunk's first document only)

where I, the state entering the chunk, comes from an exact scan of the chunks' own states
S = sum_s exp(log_decay * (C - 1 - s)) k_s^T v_s (over the chunk's last document) in chunk order
(`state_scan`). A document that starts at or inside a chunk stops the carried state there.

LASP-2 forward: S (cheap), post the scan, intra while it flies, wait, add the readout. Backward
mirrors it: the gradients dI of the entering states (cheap), post the reverse scan (giving dS, the
gradient of each chunk's own state), the intra backward while it flies, wait, add dS's share to
dk and dv. With `zigzag` a rank's two chunks go into the same single scan. The serial schedule
(`overlap=False`, see `_LASP`; what `lasp2_attention` runs, being the faster one over NVLink)
hands the entering states and dS to the kernel instead; LASP-1 (`lasp1.py`) is that schedule with
an unblocked P2P chain.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from seqpar import kernels
from seqpar.attention.state_scan import SCANS, ChunkChain, start_scan
from seqpar.parallel.sharding import chunk_order, group_size_rank

_HALF = (torch.float16, torch.bfloat16)


def lasp2_attention(q, k, v, *, log_decay, group=None, cu_seqlens=None, scale=None, layout="contiguous",
                    scan="allgather"):
    """`scan` is `parallel.linear_scan`: `allgather` (LASP-2's one all-gather) or `pipelined` (a chain)."""
    if scan not in SCANS:
        raise ValueError(f"lasp2_attention: scan={scan!r}; choose one of {SCANS}")
    # serial: on 2 H100 (docs/benchmarks, 2026-11-25) it ran at 2x the overlapped schedule's
    # efficiency (0.67 vs 0.33 at 256k tokens): the passes overlap adds cost more than the
    # exchange of a few MiB it hides over NVLink. The overlapped schedule stays for slower links.
    return lasp_attention(q, k, v, log_decay, group=group, cu_seqlens=cu_seqlens, scale=scale, layout=layout,
                          scan=scan, overlap=False)


def lasp_attention(q, k, v, log_decay, *, group, cu_seqlens, scale, layout, scan, overlap):
    """The machinery LASP-1 and LASP-2 share; `overlap` posts the scan before the intra-chunk work."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    geo = _geometry(q, group, cu_seqlens, layout, log_decay)
    return _LASP.apply(q, k, v, log_decay, geo, scale, group, scan, overlap)


@dataclass
class _Geometry:
    chunk_len: int
    n_local: int
    dtype: torch.dtype  # states and their merges: fp32, fp64 for fp64 inputs
    chain: ChunkChain
    continues: list[bool]  # per local chunk: its first token continues a document of the previous chunk
    keep: torch.Tensor  # the same as a [n_local, 1, 1, 1, 1] mask
    first_len: list[int]  # per local chunk: tokens before its first inner document start (read the entering state)
    last_start: list[int]  # per local chunk: offset of its last inner document start (feed its own state)
    kernel_cu: torch.Tensor | None  # local document boundaries for the intra-chunk kernel (packed rows)
    first_slot: torch.Tensor  # [n_local, B]: the kernel's state slot of each chunk's first document
    last_slot: torch.Tensor  # [n_local, B]: ... and of its last document
    n_slots: int


def _geometry(q, group, cu_seqlens, layout, log_decay) -> _Geometry:
    world, rank = group_size_rank(group)
    B, s_local = q.shape[:2]
    order = chunk_order(world, layout)
    n_local = len(order[0])
    if s_local % n_local:
        raise ValueError(f"lasp: local length {s_local} does not split into {n_local} chunks (layout={layout})")
    C = s_local // n_local
    n_chunks = world * n_local
    if cu_seqlens is None:
        starts = [0]  # each row is one document
    else:
        if B != 1:
            raise ValueError(f"lasp: packed documents (cu_seqlens) need batch size 1, got q of shape {tuple(q.shape)}")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != C * n_chunks:
            raise ValueError(f"lasp: cu_seqlens must run from 0 to the global length {C * n_chunks}, got {bounds}")
        starts = sorted(set(bounds[:-1]))
    inside = [[s - g * C for s in starts if g * C < s < (g + 1) * C] for g in range(n_chunks)]
    at_start = [g * C in starts for g in range(n_chunks)]

    owners = [None] * n_chunks
    for r, chunks in enumerate(order):
        for i, g in enumerate(chunks):
            owners[g] = (r, i)
    dt = torch.promote_types(q.dtype, torch.float32)
    passes = torch.tensor([not (at_start[g] or inside[g]) for g in range(n_chunks)], dtype=dt, device=q.device)
    carry = torch.exp(log_decay.to(dt) * C)[None, :] * passes[:, None]
    mine = order[rank]
    continues = [not at_start[g] for g in mine]
    keep = torch.tensor(continues, dtype=dt, device=q.device).view(-1, 1, 1, 1, 1)
    if cu_seqlens is None:  # the kernel sees B * n_local rows, row b * n_local + i is chunk i of row b
        kernel_cu = None
        first_slot = last_slot = torch.arange(B * n_local, device=q.device).view(B, n_local).T
        n_slots = B * n_local
    else:
        edges = sorted({i * C for i in range(n_local + 1)} | {i * C + s for i, g in enumerate(mine) for s in inside[g]})
        kernel_cu = torch.tensor(edges, dtype=torch.int32, device=q.device)
        first_slot = torch.tensor([[edges.index(i * C)] for i in range(n_local)], device=q.device)
        last_slot = torch.tensor([[edges.index((i + 1) * C) - 1] for i in range(n_local)], device=q.device)
        n_slots = len(edges) - 1
    return _Geometry(C, n_local, dt, ChunkChain(owners, carry, rank), continues, keep,
                     first_len=[inside[g][0] if inside[g] else C for g in mine],
                     last_start=[inside[g][-1] if inside[g] else 0 for g in mine], kernel_cu=kernel_cu,
                     first_slot=first_slot, last_slot=last_slot, n_slots=n_slots)


class _LASP(torch.autograd.Function):
    """Two schedules of the same exact math.

    overlap=True (LASP-2): the exchange flies while the kernel runs the chunks from zero state;
    the readout q.I, dI, the readout's dq and dS's share of dk, dv are separate passes over the
    chunk. overlap=False: the exchange runs first and the kernel itself reads the entering states
    (initial_state) and, backward, takes dS as the gradient of its final states, so only the S
    and dI passes are extra; the exchange is exposed. Which wins depends on the exchange's time
    against a pass over the chunk's tokens (interconnect, world size, tokens per rank).
    """

    @staticmethod
    def forward(ctx, q, k, v, log_decay, geo, scale, group, scan, overlap):
        if ctx.needs_input_grad[3]:
            raise ValueError("lasp: log_decay is a fixed per-head constant here; pass a tensor without requires_grad")
        with torch.autocast(q.device.type, enabled=False):
            lam = log_decay.to(geo.dtype)
            states = torch.stack([_outer_sum(*_segments(geo, i, "last", k, v), _state_decay(lam, geo, i), geo.dtype)
                                  for i in range(geo.n_local)])
            pending = start_scan(scan, states, geo.chain, group) if overlap else None
            # The kernel's graph is kept (not recomputed in backward): its backward is the kernel's own.
            needs = ctx.needs_input_grad[:3]
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            if overlap:
                with torch.enable_grad() if any(needs) else nullcontext():
                    intra, _ = _kernel(*leaves, log_decay, scale, geo)
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
                roots = [intra]
            else:
                entering = start_scan(scan, states, geo.chain, group).wait()
                initial = _to_slots(entering * geo.keep, geo.first_slot, geo.n_slots)
                with torch.enable_grad() if any(needs) else nullcontext():
                    intra, final = _kernel(*leaves, log_decay, scale, geo, initial)
                out = intra.detach()
                roots = [intra, final]
        ctx.save_for_backward(q, k, v, lam, entering)
        ctx.geo, ctx.scale, ctx.group, ctx.scan, ctx.overlap = geo, scale, group, scan, overlap
        ctx.roots, ctx.leaves = roots, leaves
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, lam, entering = ctx.saved_tensors
        geo, scale, scan = ctx.geo, ctx.scale, ctx.scan
        roots, leaves = ctx.roots, ctx.leaves
        del ctx.roots, ctx.leaves
        dout = dout.contiguous()
        d_entering = torch.zeros_like(entering)
        for i in _continuing(geo):
            d_entering[i] = _outer_sum(*_segments(geo, i, "first", q, dout), scale * _entry_decay(lam, geo, i),
                                       geo.dtype)
        # every rank joins the reverse scan, whichever of q, k, v it needs gradients for
        pending = start_scan(scan, d_entering, geo.chain, ctx.group, reverse=True)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        if not ctx.overlap:
            intra, final = roots
            d_final = _to_slots(pending.wait(), geo.last_slot, geo.n_slots).to(final.dtype)
            outs, grad_outs = zip(*[(r, g) for r, g in zip(roots, (dout, d_final)) if r.requires_grad])
            grads = iter(torch.autograd.grad(outs, wanted, grad_outs, allow_unused=True) if wanted else ())
            return (*(next(grads) if leaf.requires_grad else None for leaf in leaves), *[None] * 6)

        grads = iter(torch.autograd.grad(roots[0], wanted, dout) if wanted else ())
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


def _kernel(q, k, v, log_decay, scale, geo, initial=None):
    """Every local chunk in one kernel call, from `initial` (per state slot) or zero state."""
    final = initial is not None
    if geo.kernel_cu is not None:  # one packed row: chunk edges count as document edges
        return kernels.lightning_attn(q, k, v, log_decay, scale=scale, cu_seqlens=geo.kernel_cu,
                                      initial_state=initial, output_final_state=final)
    B, S = q.shape[:2]
    rows = [t.reshape(B * geo.n_local, geo.chunk_len, *t.shape[2:]) for t in (q, k, v)]
    o, last = kernels.lightning_attn(*rows, log_decay, scale=scale, initial_state=initial, output_final_state=final)
    return o.reshape(B, S, *o.shape[2:]), last


def _to_slots(x, slots, n_slots):
    """Per-chunk states `[n_local, B, H, Dk, Dv]` into the kernel's per-document slots (zero elsewhere)."""
    out = x.new_zeros(n_slots, *x.shape[2:])
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
