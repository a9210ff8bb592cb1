"""attn_merge_ in one Triton pass: per block of rows of one (batch, head), both lse are read,
the merged lse and the two weights are formed in registers, and old and o are read once and out
written once (row-major tiles of the head dim). Memory-bound: at 16k rows x 32 heads x 128 in bf16
it moves 3 x 134 MB where torch's ops move about 1 GB (an fp32 product buffer written and read)."""
from __future__ import annotations

import triton
import triton.language as tl


# The row count, the strides that follow it and where an lse view starts (a padded call's rows from
# its f-th) change with every call: no compiled variant per divisibility or alignment, each of which
# cost a compile inside a training step (kernels/jit_stats.py).
@triton.jit(do_not_specialize=["n_rows", "s_old_b", "s_o_b", "s_out_b", "s_lse_b", "s_lse_h", "s_l_b", "s_l_h"],
            do_not_specialize_on_alignment=["lse", "l"])
def _merge(old, o, lse, l, out, n_rows, H,
           s_old_b, s_old_n, s_old_h, s_o_b, s_o_n, s_o_h, s_out_b, s_out_n, s_out_h,
           s_lse_b, s_lse_h, s_lse_n, s_l_b, s_l_h, s_l_n,
           D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    in_rows = rows < n_rows
    a = tl.load(lse + b * s_lse_b + h * s_lse_h + rows * s_lse_n, mask=in_rows, other=float("-inf")).to(tl.float32)
    c = tl.load(l + b * s_l_b + h * s_l_h + rows * s_l_n, mask=in_rows, other=float("-inf")).to(tl.float32)
    top = tl.maximum(a, c)
    unseen = top == float("-inf")  # neither block saw a key: weights 0, lse stays -inf
    top = tl.where(unseen, 0.0, top)
    wa = tl.exp(a - top)
    wc = tl.exp(c - top)
    total = wa + wc
    inv = tl.where(unseen, 0.0, 1.0 / tl.where(unseen, 1.0, total))
    new = tl.where(unseen, float("-inf"), top + tl.log(tl.where(unseen, 1.0, total)))
    mask = in_rows[:, None] & (cols[None, :] < D)
    x = tl.load(old + b * s_old_b + h * s_old_h + rows[:, None] * s_old_n + cols[None, :], mask=mask, other=0.0)
    y = tl.load(o + b * s_o_b + h * s_o_h + rows[:, None] * s_o_n + cols[None, :], mask=mask, other=0.0)
    merged = x.to(tl.float32) * (wa * inv)[:, None] + y.to(tl.float32) * (wc * inv)[:, None]
    tl.store(out + b * s_out_b + h * s_out_h + rows[:, None] * s_out_n + cols[None, :],
             merged.to(out.dtype.element_ty), mask=mask)
    tl.store(lse + b * s_lse_b + h * s_lse_h + rows * s_lse_n, new.to(lse.dtype.element_ty), mask=in_rows)


def attn_merge_triton_(old, o, lse, l, out):
    B, n, H, D = out.shape
    if n == 0 or B * H == 0:
        return out, lse
    block_d = triton.next_power_of_2(D)
    block_n = max(16, min(128, 4096 // block_d))  # two fp32 tiles of <= 4096 values per program
    grid = (triton.cdiv(n, block_n), B * H)
    _merge[grid](old, o, lse, l, out, n, H, *old.stride()[:3], *o.stride()[:3], *out.stride()[:3],
                 *lse.stride(), *l.stride(), D=D, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4)
    return out, lse
