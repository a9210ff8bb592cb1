"""Linear attention over the cp group: LASP-2 (Sun et al., 2025), one all-gather of memory states.

Decayed linear attention carries a fixed-size memory state M (H x Dk x Dv) along the sequence, so
a rank needs from the ranks before it only their chunks' states, not their tokens. Each rank
computes its chunks' outputs as if they started from zero state plus each chunk's own final
state; ONE all-gather of those states lets every rank fold the states of all earlier chunks
into the state entering each of its chunks, and add `q . state` to its outputs.

This version is exact through autograd: the all-gather's backward is the mirrored single
reduce-scatter of the state gradients. A document boundary resets the carried state.
"""
from __future__ import annotations

import torch

from seqpar import kernels
from seqpar.parallel.sharding import all_gather_autograd, depend_on, chunk_order, group_size_rank, local_ranges


def lasp2_attention(q, k, v, *, log_decay, group=None, cu_seqlens=None, scale=None, layout="contiguous"):
    world, rank = group_size_rank(group)
    B, s_local, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    seq_len = s_local * world
    if cu_seqlens is None:  # equal-length rows are documents of one packed row
        cu_seqlens = torch.arange(0, B * seq_len + 1, seq_len, dtype=torch.int32, device=q.device)
        q, k, v = (t.reshape(1, B * s_local, *t.shape[2:]) for t in (q, k, v))
    bounds = cu_seqlens.tolist()
    doc_starts = set(bounds[:-1])
    ranges = [(row * seq_len + a, row * seq_len + b) for row in range(B)
              for a, b in local_ranges(seq_len, world, rank, layout)]
    chunk_len = ranges[0][1] - ranges[0][0]
    pieces = [(a, b, slice(i * chunk_len, (i + 1) * chunk_len)) for i, (a, b) in enumerate(ranges)]

    outs, states = [], []
    for a, b, sl in pieces:
        local_cu = [0] + [x - a for x in bounds if a < x < b] + [b - a]
        o, final = kernels.lightning_attn(q[:, sl], k[:, sl], v[:, sl], log_decay, scale=scale,
                                          cu_seqlens=_int32(local_cu, q), output_final_state=True)
        outs.append(o)
        states.append(final[-1])
    state_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    gathered = all_gather_autograd(torch.stack(states).to(state_dtype), group)  # [world, pieces, H, Dk, Dv]

    n_chunks = seq_len // chunk_len
    owner = {}  # global chunk index -> (rank, index among that rank's pieces)
    for r, chunks in enumerate(chunk_order(world, layout)):
        for row in range(B):
            for i, c in enumerate(chunks):
                owner[row * n_chunks + c] = (r, row * len(chunks) + i)

    chunk_decay = torch.exp(log_decay.to(state_dtype) * chunk_len)[:, None, None]
    incoming = _incoming_states(gathered, owner, chunk_len, doc_starts, chunk_decay)

    out = []
    for (a, b, sl), o in zip(pieces, outs):
        carried = incoming[a // chunk_len]
        if carried is not None:  # only the chunk's first document continues from earlier chunks
            n = min([x for x in bounds if a < x] + [b]) - a
            o = torch.cat([o[:, :n] + _readout(q[:, sl][:, :n], carried, log_decay, scale), o[:, n:]], dim=1)
        out.append(o)
    out = depend_on(torch.cat(out, dim=1), gathered)  # the backward reduce-scatter runs on every rank
    return out.reshape(B, s_local, *out.shape[2:])


def _incoming_states(gathered, owner, chunk_len, doc_starts, chunk_decay):
    """State entering each global chunk (None where a document starts at the chunk's start)."""
    incoming, carry = [], None
    for c in range(len(owner)):
        start = c * chunk_len
        if start in doc_starts:
            carry = None
        incoming.append(carry)
        r, i = owner[c]
        own = gathered[r, i]
        starts_inside = any(start < s < start + chunk_len for s in doc_starts)
        carry = own if (carry is None or starts_inside) else own + chunk_decay * carry
    return incoming


def _readout(q, state, log_decay, scale):
    """scale * exp(log_decay * (t + 1)) * q_t . state for the tokens t of a chunk's first document."""
    t = torch.arange(1, q.shape[1] + 1, device=q.device, dtype=state.dtype)
    decay = torch.exp(t[:, None] * log_decay.to(state.dtype)[None, :])  # [T, H]
    o = torch.einsum("bthd,hdv->bthv", q.to(state.dtype), state) * decay[None, :, :, None]
    return (scale * o).to(q.dtype)


def _int32(values, like):
    return torch.tensor(values, dtype=torch.int32, device=like.device)
