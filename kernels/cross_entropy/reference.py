"""Linear layer + cross-entropy without ever holding the `[N, V]` logits.

The forward walks `chunk_size` rows at a time: logits of the chunk (fp32), their lse, the loss, and
right away d(loss)/d(logits) = softmax - onehot, turned into the chunk's grad_hidden and added to
grad_weight. Only those grads are kept; backward just scales them by grad_output (the loss is a sum,
so its gradient is linear in grad_output). Peak extra memory: one chunk's logits plus the grads.

Under CUDA autocast the matmuls take autocast-dtype (bf16) inputs, as an autocast `F.linear`
would, but on CUDA the logits leave the matmul in fp32 (CPU bf16 rounds them to bf16 first);
lse and the loss are fp32; grad_weight accumulates in fp32 (or the
weight's dtype if wider) and is returned in the weight's dtype.
"""
from __future__ import annotations

import torch


def _matmul_dtype(hidden, weight):
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def token_rows(hidden, targets):
    """(hidden as `[N, d]` rows, targets as `[N]`), checked to hold the same tokens."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if h.shape[0] != t.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on tokens")
    return h, t


def _logits(h, w, acc):
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        # fp32 output straight from the tensor-core accumulator: no bf16 rounding of the logits
        return torch.mm(h, w.T, out_dtype=torch.float32)
    return (h @ w.T).to(acc)


class FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, need_grad_hidden, need_grad_weight):
        h, t = token_rows(hidden, targets)
        mm = _matmul_dtype(hidden, weight)
        acc = torch.promote_types(mm, torch.float32)
        w = weight.to(mm)
        loss = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_grad_hidden else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_grad_weight else None
        # explicit dtypes above; autocast must not re-cast the chunk matmuls behind our back
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, h.shape[0], chunk_size):
                hc = h[start:start + chunk_size].to(mm)
                tc = t[start:start + chunk_size]
                valid = tc != ignore_index
                safe_t = torch.where(valid, tc, torch.zeros_like(tc))
                logits = _logits(hc, w, acc)
                lse = torch.logsumexp(logits, dim=-1)
                picked = logits.gather(1, safe_t[:, None]).squeeze(1)
                loss += torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                if grad_h is None and grad_w is None:
                    continue
                dlogits = torch.exp(logits.sub_(lse[:, None]))  # softmax, reusing the logits buffer
                dlogits.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
                dlogits.mul_(valid[:, None])
                dlogits = dlogits.to(mm)
                if grad_h is not None:
                    grad_h[start:start + chunk_size] = (dlogits @ w).to(h.dtype)
                if grad_w is not None:
                    grad_w += (dlogits.T @ hc).to(grad_w.dtype)
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(grad_h.view_as(hidden) if grad_h is not None else None,
                              grad_w.to(weight.dtype) if grad_w is not None else None)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = _scale(grad_h, grad_loss, ctx.chunk_size) if grad_h is not None else None
        gw = _scale(grad_w, grad_loss, ctx.chunk_size) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def _scale(grad, factor, chunk_size):
    if grad.dtype in (torch.float32, torch.float64):
        return grad * factor.to(grad.dtype)
    # A bf16 grad_output factor such as 1/n_tokens would be off by up to 0.4%: scale in fp32,
    # chunk by chunk so no fp32 copy of the whole grad exists.
    out = torch.empty_like(grad)
    flat, flat_out = grad.reshape(-1, grad.shape[-1]), out.view(-1, grad.shape[-1])
    for start in range(0, flat.shape[0], chunk_size):
        flat_out[start:start + chunk_size] = (flat[start:start + chunk_size].float() * factor).to(grad.dtype)
    return out


def fused_linear_cross_entropy_reference(hidden, weight, targets, *, ignore_index=-100, chunk_size=4096):
    """Sum over non-ignored tokens of cross_entropy(hidden @ weight.T, targets); caller normalises."""
    grad_on = torch.is_grad_enabled()
    return FusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, int(chunk_size),
                                         grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
