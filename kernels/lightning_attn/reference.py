"""Lightning attention (decayed linear attention, TransNormerLLM form) in chunked plain torch.

Per document, with a = exp(log_decay[h]) and M_{-1} the initial state:
    M_t = a * M_{t-1} + k_t^T v_t,    o_t = scale * q_t M_t.
Blocks of BLOCK tokens: inside a block a masked quadratic form with the decay matrix
exp(log_decay * (t - s)); across blocks the state is carried. Every decay factor is exp of a
non-positive number (distances are clamped at 0 before multiplying by log_decay <= 0), so nothing
overflows however long the document; padded tail positions carry zero k and v.

Math runs in fp32 (fp64 for fp64 inputs); o comes back in q's dtype, states in the compute dtype.
"""
from __future__ import annotations

import torch

BLOCK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def documents(q, cu_seqlens):
    """[(batch row, start, end)] for each state slot: a row per batch entry, or a packed document."""
    B, S = q.shape[:2]
    if cu_seqlens is None:
        return [(b, 0, S) for b in range(B)]
    if B != 1:
        raise ValueError(f"packed documents need batch size 1, got q of shape {tuple(q.shape)}")
    bounds = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
    if bounds[0] != 0 or bounds[-1] != S or any(x > y for x, y in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to {S}, got {bounds}")
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]


def lightning_attn_reference(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None):
    H, Dk, Dv = q.shape[2], q.shape[3], v.shape[3]
    scale = Dk ** -0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    docs = documents(q, cu_seqlens)
    if initial_state is not None and tuple(initial_state.shape) != (len(docs), H, Dk, Dv):
        raise ValueError(f"initial_state must be {(len(docs), H, Dk, Dv)}, got {tuple(initial_state.shape)}")
    lam = log_decay.to(dt)
    outs, finals = [[] for _ in range(q.shape[0])], []
    for i, (b, s, e) in enumerate(docs):
        state = None if initial_state is None else initial_state[i].to(dt)
        o, final = _chunked(q[b, s:e].to(dt), k[b, s:e].to(dt), v[b, s:e].to(dt), lam, scale, state)
        outs[b].append(o)
        finals.append(final)
    o = torch.stack([torch.cat(row, dim=0) for row in outs]).to(q.dtype)
    return o, (torch.stack(finals) if output_final_state else None)


def _chunked(q, k, v, lam, scale, state):
    """One document: q, k `[L, H, Dk]`, v `[L, H, Dv]`, state `[H, Dk, Dv]` or None."""
    L, H, Dk = q.shape
    Dv = v.shape[-1]
    if state is None:
        state = q.new_zeros(H, Dk, Dv)
    if L == 0:
        return q.new_zeros(0, H, Dv), state
    nb = -(-L // BLOCK)
    pad = nb * BLOCK - L
    qb, kb, vb = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).view(nb, BLOCK, H, -1) for t in (q, k, v))
    pos = torch.arange(BLOCK, device=q.device)
    dist = (pos[:, None] - pos[None, :]).clamp(min=0)
    causal = pos[:, None] >= pos[None, :]
    # [H, C, C]: exp(log_decay * (t - s)) on and below the diagonal
    intra_decay = torch.exp(lam[:, None, None] * dist) * causal
    scores = torch.einsum("nthd,nshd->nhts", qb, kb) * intra_decay
    o = torch.einsum("nhts,nshe->nthe", scores, vb)

    # Tokens seen per block (the last one is short); state decays per real token only.
    lengths = torch.full((nb,), BLOCK, device=q.device)
    lengths[-1] = BLOCK - pad
    # contribution of block n to the state at its own last real token
    to_end = torch.exp(lam[None, None, :] * (lengths[:, None, None] - 1 - pos[None, :, None]).clamp(min=0))
    block_kv = torch.einsum("nshd,nsh,nshe->nhde", kb, to_end, vb)
    block_decay = torch.exp(lam[None, :] * lengths[:, None])  # [nb, H]
    entering = []
    for n in range(nb):
        entering.append(state)
        state = block_decay[n][:, None, None] * state + block_kv[n]
    entering = torch.stack(entering)  # [nb, H, Dk, Dv]: state before each block's first token

    from_start = torch.exp(lam[None, :] * (pos[:, None] + 1))  # [C, H]
    o = o + torch.einsum("nthd,th,nhde->nthe", qb, from_start, entering)
    return (scale * o).reshape(nb * BLOCK, H, Dv)[:L], state
