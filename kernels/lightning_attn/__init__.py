"""Lightning attention: `lightning_attn` picks its implementation through `kernels.dispatch`.

`seqpar.kernels.lightning_attn` is this function; the implementations are the modules
`seqpar.kernels.lightning_attn.reference` (chunked torch), `.triton` (CUDA, imported only when
dispatch picks it, so CPU runs never need triton) and `.naive` (recurrent, tests only).
"""
from __future__ import annotations

import torch

from seqpar.kernels.dispatch import backend
from seqpar.kernels.lightning_attn.reference import lightning_attn_reference


def lightning_attn(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, exchange=None):
    """Decayed linear attention; q, k `[B, S, H, Dk]`, v `[B, S, H, Dv]`, log_decay `[H]` (<= 0).

    Per document: M_t = exp(log_decay) M_{t-1} + k_t^T v_t, o_t = scale * q_t M_t, M_{-1} =
    initial_state (zeros if None). States are `[N, H, Dk, Dv]`, N = B, or the number of documents
    when `cu_seqlens` is given. Returns (o in q's dtype, final state or None).

    `exchange` (instead of `initial_state`; LASP-2's hook): an object with `forward(own)` and
    `backward(d_initial)`, a linear map and its adjoint, each returning a pending result whose
    `wait()` gives the answer, or None for zeros (this rank receives nothing: no fold of zeros).
    `own` are the documents' exit
    states from a zero state (fp32/fp64, `[N, H, Dk, Dv]`); the kernel calls `forward` between
    its passes over the tokens and uses the answer as `initial_state`, so a caller can exchange
    states with other ranks without an extra pass over k and v (or, in backward, over q and do;
    there the kernel runs its dq pass before it waits). Both are called on every rank, once per
    forward and once per backward.
    """
    if exchange is not None and (initial_state is not None or output_final_state):
        raise ValueError("lightning_attn: an exchange supplies the initial state and returns no final state; "
                         "pass exchange alone, or initial_state / output_final_state without it")
    impl = backend("lightning_attn", q, k, v, log_decay, initial_state)
    if impl == "triton":
        from seqpar.kernels.lightning_attn.triton import lightning_attn_triton
        return lightning_attn_triton(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state, cu_seqlens=cu_seqlens, exchange=exchange)
    assert impl == "reference", impl
    if exchange is not None:  # the same map through autograd: own states, exchange, the pass from them
        own = lightning_attn_reference(q.detach(), k, v, log_decay, scale=scale, output_final_state=True,
                                       cu_seqlens=cu_seqlens)[1]
        initial_state = _Exchange.apply(own, exchange)
    return lightning_attn_reference(q, k, v, log_decay, scale=scale, initial_state=initial_state,
                                    output_final_state=output_final_state, cu_seqlens=cu_seqlens)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, own, exchange):
        ctx.exchange = exchange
        return _answer(exchange.forward(own), own)

    @staticmethod
    def backward(ctx, d_initial):
        return _answer(ctx.exchange.backward(d_initial), d_initial), None


def _answer(pending, like):
    got = pending.wait()
    return torch.zeros_like(like) if got is None else got
