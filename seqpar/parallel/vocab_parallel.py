"""Vocabulary-parallel cross-entropy: the output head split over the vocabulary across tp ranks.

Megatron-LM's vocab-parallel loss combined with the chunked fused linear + cross-entropy of
`kernels/cross_entropy`: tp rank r holds vocabulary rows [r V/tp, (r+1) V/tp) of the head and,
for every token (the hidden states are whole on every tp rank), computes only its slice of the
logits, `chunk_size` rows at a time, so neither the `[N, V]` nor the `[N, V/tp]` logits ever
exist. Per chunk the ranks all-reduce three numbers per row: the max logit (MAX), then the sum of
exp(logit - max) and the target's logit, which only its owner has (one SUM of both). As in the
single-device kernel the gradients are formed in the forward: d(loss)/d(logits) = softmax -
onehot on the local slice gives this rank's part of grad_hidden (summed over tp once, at the end)
and its own rows of grad_weight (no communication). The loss is the same on every tp rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.kernels.cross_entropy.reference import _logits, _matmul_dtype, _scale, token_rows


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, group,
                                 vocab_start: int, ignore_index: int = -100, chunk_size: int = 4096) -> torch.Tensor:
    """SUM over non-ignored tokens of cross_entropy(hidden @ W.T, targets), where `weight` `[V/tp, d]`
    holds rows [vocab_start, vocab_start + V/tp) of W and the other rows live on the other ranks of
    `group`. `hidden` `[..., d]` and `targets` `[...]` (global vocabulary ids) are the same on
    every rank of `group`; so are the returned loss and grad_hidden."""
    grad_on = torch.is_grad_enabled()
    return _VocabParallelCE.apply(hidden, weight, targets, group, int(vocab_start), ignore_index, int(chunk_size),
                                  grad_on and hidden.requires_grad, grad_on and weight.requires_grad)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, group, vocab_start, ignore_index, chunk_size, need_gh, need_gw):
        h, t = token_rows(hidden, targets)
        mm = _matmul_dtype(hidden, weight)
        acc = torch.promote_types(mm, torch.float32)
        w = weight.to(mm)
        n_local = weight.shape[0]
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.zeros(h.shape, dtype=acc, device=h.device) if need_gh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_gw else None
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                hc = h[start:start + chunk_size].to(mm)
                tc = t[start:start + chunk_size]
                valid = tc != ignore_index
                local_t = tc - vocab_start
                mine = valid & (local_t >= 0) & (local_t < n_local)  # the target's row lives on this rank
                safe_t = torch.where(mine, local_t, torch.zeros_like(local_t))
                logits = _logits(hc, w, acc)
                row_max = logits.max(dim=-1).values
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
                picked = torch.where(mine, logits.gather(1, safe_t[:, None]).squeeze(1), torch.zeros_like(row_max))
                logits.sub_(row_max[:, None]).exp_()  # in place: the chunk's logits are its one big buffer
                sums = torch.stack([logits.sum(dim=-1), picked])  # the target logit: only its owner adds it
                dist.all_reduce(sums, group=group)
                sum_exp, target_logit = sums
                lse = row_max + sum_exp.log()
                loss += torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
                if grad_h is None and grad_w is None:
                    continue
                dlogits = logits.div_(sum_exp[:, None])  # softmax of this rank's slice
                dlogits.scatter_add_(1, safe_t[:, None], -mine.to(acc)[:, None])
                dlogits.mul_(valid[:, None])
                dlogits = dlogits.to(mm)
                if grad_h is not None:
                    grad_h[start:start + chunk_size] = dlogits @ w
                if grad_w is not None:
                    grad_w += (dlogits.T @ hc).to(grad_w.dtype)
            if grad_h is not None:
                dist.all_reduce(grad_h, group=group)  # each rank saw only its vocabulary slice
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(grad_h.to(hidden.dtype).view_as(hidden) if grad_h is not None else None,
                              grad_w.to(weight.dtype) if grad_w is not None else None)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors  # the loss is a sum: its gradient is linear in grad_loss
        scale = lambda g: None if g is None else _scale(g, grad_loss, ctx.chunk_size)  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None, None, None, None, None
