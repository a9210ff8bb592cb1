"""Token-by-token recurrence of lightning attention; slow, only for checking the chunked reference."""
from __future__ import annotations

import torch

from seqpar.kernels.lightning_attn.reference import compute_dtype, documents


def lightning_attn_recurrent(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                             cu_seqlens=None):
    H, Dk, Dv = q.shape[2], q.shape[3], v.shape[3]
    scale = Dk ** -0.5 if scale is None else scale
    dt = compute_dtype(q.dtype)
    decay = torch.exp(log_decay.to(dt))[:, None, None]
    o = q.new_zeros(*q.shape[:3], Dv, dtype=dt)
    finals = []
    for i, (b, s, e) in enumerate(documents(q, cu_seqlens)):
        M = q.new_zeros(H, Dk, Dv, dtype=dt) if initial_state is None else initial_state[i].to(dt)
        for t in range(s, e):
            M = decay * M + k[b, t].to(dt)[:, :, None] * v[b, t].to(dt)[:, None, :]
            o[b, t] = scale * torch.einsum("hd,hde->he", q[b, t].to(dt), M)
        finals.append(M)
    return o.to(q.dtype), (torch.stack(finals) if output_final_state else None)
