"""Chunked linear + cross-entropy with one Triton pass per chunk over the fp32 logits.

Same algorithm and semantics as `reference.py` (sum of losses, `ignore_index`, fp32 logits straight
out of the matmul on CUDA, grads formed in the forward, autocast rules), with three changes that
matter at 64k tokens x 128k vocabulary, where the matmuls are ~150 ms on an H100 and every pass
over a chunk's fp32 logits costs a few ms:

1. `_softmax_grad_rows` reads each logits row twice (online max/sum-exp, then the gradient) and
   writes softmax - onehot once, in the matmul dtype: ~10 bytes per logit instead of the
   reference's ~40 (logsumexp, gather, sub, exp, scatter, mul, cast as separate torch passes).
2. The gradient is written over the logits' own storage: row r of the 16-bit gradient fills the
   first half of row r's fp32 bytes, read back as a [C, V] view with row stride 2V. Only row r's
   program touches row r; its store of block j covers fp32 bytes of blocks <= j only, and a
   barrier between each block's load and store makes every warp's loads of those blocks come
   first (warps are not in lockstep: without it a fast warp could overwrite logits a slow warp has
   yet to read). Loads of later blocks issued early are never overwritten. The chunk's extra
   memory is just its fp32 logits (C x V x 4 bytes), allocated once.
3. grad_weight accumulates in fp32 inside the matmul (`addmm` with an fp32 out and beta=1) where
   torch allows it, instead of a 16-bit product per chunk cast and added in separate passes.

The target's logit is picked up during the first pass (from the same loads the lse comes from),
not by a separate gather: the gradient overwrite can then never race with it. A target outside
[0, V) that is not `ignore_index` makes that row's loss NaN (the reference raises; a check on the
host would cost a sync per step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from seqpar.kernels.cross_entropy.reference import FusedLinearCrossEntropy, _matmul_dtype, token_rows

BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _softmax_grad_rows(logits_ptr, grad_ptr, targets_ptr, loss_ptr, V, s_logits, s_grad, ignore_index,
                       WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * s_logits
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    cols = tl.arange(0, BLOCK)
    # per-lane running max and sum of exp; a finite floor keeps exp(m - m_new) free of inf - inf
    m = tl.full([BLOCK], -3.0e38, dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    picked = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        x = tl.load(base + idx, mask=idx < V, other=float("-inf"))
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        picked += tl.where(idx == target, x, 0.0)
    row_max = tl.max(m, axis=0)
    lse = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), axis=0))
    in_range = (target >= 0) & (target < V)
    loss = tl.where(in_range, lse - tl.sum(picked, axis=0), float("nan"))
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        gbase = grad_ptr + row * s_grad
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, V, BLOCK):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < V, other=0.0)
            # A 16-bit store of block j lands on fp32 bytes of blocks <= j that OTHER warps load:
            # every warp must have loaded block j (and, by the previous barriers, all before it)
            # before any warp stores, and warps must not drift an iteration apart.
            tl.debug_barrier()
            g = tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)
            tl.store(gbase + idx, (g * keep).to(grad_ptr.dtype.element_ty), mask=idx < V)


def _grad_view(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [C, V] gradient written over fp32 logits `buf` (see point 2 of the module doc)."""
    if dtype == buf.dtype:
        return buf
    C, V = buf.shape
    return buf.view(dtype).view(C, -1)[:, :V]  # row r starts at the first byte of logits row r


_FP32_MM_OUT = [True]  # torch versions whose mm writes an fp32 out= from 16-bit operands


def _logits_into(buf, h, w):
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16):
        # fp32 straight from the tensor-core accumulator, as in the reference
        if _FP32_MM_OUT[0]:
            try:
                return torch.mm(h, w.T, out_dtype=torch.float32, out=buf)
            except (RuntimeError, TypeError):
                _FP32_MM_OUT[0] = False
        return buf.copy_(torch.mm(h, w.T, out_dtype=torch.float32))
    if h.dtype == buf.dtype:
        return torch.mm(h, w.T, out=buf)
    return buf.copy_(h @ w.T)  # CPU 16-bit: rounded to 16 bits first, as the reference does


_FP32_ADDMM = [True]  # torch versions whose addmm takes an fp32 accumulator with 16-bit operands


def _accumulate(acc, a, b):
    """acc += a @ b with acc in fp32 (or fp64) and a, b in the matmul dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        if _FP32_ADDMM[0]:
            try:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                return
            except (RuntimeError, TypeError):  # this torch wants the accumulator in a's dtype
                _FP32_ADDMM[0] = False
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
        return
    acc += (a @ b).to(acc.dtype)


class TritonFusedLinearCrossEntropy(FusedLinearCrossEntropy):  # the same backward: grads formed in forward
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden, weight, targets, ignore_index, chunk_size, need_grad_hidden, need_grad_weight):
        h, t = token_rows(hidden, targets)
        mm = _matmul_dtype(hidden, weight)
        if mm not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"the Triton cross-entropy computes in fp32; matmul dtype {mm} needs the reference")
        N, V = h.shape[0], weight.shape[0]
        w = weight.to(mm)
        t = t.contiguous()
        write_grad = need_grad_hidden or need_grad_weight
        losses = torch.empty(N, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad_hidden else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_grad_weight else None
        buf = torch.empty(min(chunk_size, N), V, dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for start in range(0, N, chunk_size):
                hc = h[start:start + chunk_size].to(mm)
                rows = hc.shape[0]
                logits = _logits_into(buf[:rows], hc, w)
                grad = _grad_view(logits, mm)
                _softmax_grad_rows[(rows,)](logits, grad, t[start:start + rows], losses[start:start + rows], V,
                                            logits.stride(0), grad.stride(0), ignore_index, WRITE_GRAD=write_grad,
                                            BLOCK=min(BLOCK_V, triton.next_power_of_2(V)), num_warps=NUM_WARPS)
                if grad_h is not None:
                    if grad_h.dtype == mm:
                        torch.mm(grad, w, out=grad_h[start:start + rows])
                    else:
                        grad_h[start:start + rows] = (grad @ w).to(h.dtype)
                if grad_w is not None:
                    _accumulate(grad_w, grad.T, hc)
        del buf
        ctx.chunk_size = chunk_size
        ctx.save_for_backward(grad_h.view_as(hidden) if grad_h is not None else None,
                              grad_w.to(weight.dtype) if grad_w is not None else None)
        return losses.sum()


def fused_linear_cross_entropy_triton(hidden, weight, targets, *, ignore_index=-100, chunk_size=4096):
    """Sum over non-ignored tokens of cross_entropy(hidden @ weight.T, targets); caller normalises."""
    grad_on = torch.is_grad_enabled()
    return TritonFusedLinearCrossEntropy.apply(hidden, weight, targets, ignore_index, int(chunk_size),
                                               grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
