"""Lightning attention: `lightning_attn` picks its implementation through `kernels.dispatch`.

`seqpar.kernels.lightning_attn` is this function; the implementations are the modules
`seqpar.kernels.lightning_attn.reference` (chunked torch), `.triton` (CUDA, imported only when
dispatch picks it, so CPU runs never need triton) and `.naive` (recurrent, tests only).
"""
from __future__ import annotations

from seqpar.kernels.dispatch import backend
from seqpar.kernels.lightning_attn.reference import lightning_attn_reference


def lightning_attn(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None):
    """Decayed linear attention; q, k `[B, S, H, Dk]`, v `[B, S, H, Dv]`, log_decay `[H]` (<= 0).

    Per document: M_t = exp(log_decay) M_{t-1} + k_t^T v_t, o_t = scale * q_t M_t, M_{-1} =
    initial_state (zeros if None). States are `[N, H, Dk, Dv]`, N = B, or the number of documents
    when `cu_seqlens` is given. Returns (o in q's dtype, final state or None).
    """
    impl = backend("lightning_attn", q, k, v, log_decay, initial_state)
    if impl == "triton":
        from seqpar.kernels.lightning_attn.triton import lightning_attn_triton
        return lightning_attn_triton(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    assert impl == "reference", impl
    return lightning_attn_reference(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)
