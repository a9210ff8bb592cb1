"""RMSNorm and rotary embeddings (rotate-half) in Triton, forward and backward.

Both are memory-bound: each kernel reads its inputs once and writes its outputs once, in the
inputs' dtype, with fp32 math in registers (the reference's semantics, `reference.py`).

RMSNorm keeps a whole row in registers (hidden sizes up to `MAX_NORM_DIM`), so rstd is recomputed
in the backward from x instead of saved. The weight gradient is reduced in two stages: each
backward program owns a contiguous range of rows and writes one fp32 partial row; the partials
[programs, N] are then summed by torch. Atomics on one fp32 row would serialise every program on
the same N addresses and make dw depend on the programs' finishing order.

RoPE treats x `[B, S, H, D]` as rows (b, s, h) of D/2 pairs; the cos/sin row of (b, s) is read
once per head, which the L1/L2 caches absorb. The backward is the same kernel rotating by -angle.
Tile shapes are tuned per hidden size / head dim and dtype only (never the token count), so
changing batch shapes never re-tune.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from seqpar.kernels.autotune import autotune

MAX_NORM_DIM = 8192  # a row of fp32 in registers per program; wider rows go to torch's kernel


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(rows_options, warps_options):
    configs = [triton.Config({"BLOCK_M": m}, num_warps=w) for m in rows_options for w in warps_options]
    return configs


def _prune_by_tile(min_tile, max_tile, width_key, per_thread):
    """Keep configs whose tile (rows x padded width) holds `per_thread` (lo, hi) elements per thread.

    Measured from the cubins (ptxas for sm_90): the backward at 16 fp32 elements per thread per
    operand needs ~130 registers, at 32 ~250 (one CTA per SM, too few bytes in flight); at 8, ~64."""
    lo, hi = per_thread

    def prune(configs, named_args, **kwargs):
        width = {**named_args, **kwargs}[width_key]
        kept = [c for c in configs
                if min_tile <= c.kwargs["BLOCK_M"] * width <= max_tile
                and lo <= c.kwargs["BLOCK_M"] * width // (32 * c.num_warps) <= hi]
        if _interpreting():  # one config: the interpreter's "benchmark" would run every one
            kept = kept[:1]
        if not kept:  # tiny rows: the widest tile there is, few warps
            kept = [max(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]
        return kept
    return prune


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, per_sm: int) -> int:
    """Backward programs for the two-stage weight gradient: a few per SM, so partials stay small."""
    if device.type != "cuda":
        return 4
    return per_sm * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------ RMSNorm

@autotune(configs=_configs([1, 2, 4, 8, 16, 32, 64], [4, 8, 16, 32]), key=["N"],
          prune_configs_by={"early_config_prune": _prune_by_tile(1024, 16384, "BLOCK_N", (4, 16))})
@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, M, N, sx, sy, eps, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows * sy + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# Backward loop variants, (programs per SM, STAGES). The persistent loop of the plain one ("loop")
# runs load -> two row reductions -> store in series, with one 32-warp CTA per SM at N = 8192 (64
# registers a thread is all 1024 threads get): nothing is in flight during the reductions, 76% of
# the copy bandwidth on an H100 (2026-11-25), 61-67% on an H200. STAGES > 0: `tl.range(num_stages=)`,
# which makes Triton's pipeliner stage the loads of a dot-free loop through shared memory with
# cp.async (it does so only for loops that carry the attribute). Measured on an H200 (2026-11-26,
# docs/benchmarks/2026-11-26-4xh200/tune_summary.txt, 64k rows x 2048/4096/8192): pipe4 84-94% of
# the copy, pipe3_1 83-91%; register prefetching and two stages stayed at 61-82% and were dropped.
# `SEQPAR_RMS_BWD` picks one (read per call); each is tuned apart (the autotune key holds both).
# A width that is not a multiple of 16 loses the cp.async (too narrow an aligned run) and runs
# unstaged.
RMS_BWD_VARIANTS = {"loop": (4, 0), "pipe3_1": (1, 3), "pipe4": (2, 4)}
RMS_BWD_DEFAULT = "pipe4"
RMS_BWD_ENV = "SEQPAR_RMS_BWD"


def rms_bwd_variant(name: str | None = None) -> tuple[int, int]:
    name = name or os.environ.get(RMS_BWD_ENV, "") or RMS_BWD_DEFAULT
    if name not in RMS_BWD_VARIANTS:
        raise ValueError(f"{RMS_BWD_ENV}={name!r} is not one of: {', '.join(RMS_BWD_VARIANTS)}")
    return RMS_BWD_VARIANTS[name]


@triton.jit
def _rms_bwd_block(x, dy, w, dw, rows, cols, mask, dx_ptr, sdx, N, eps):
    """dx of one block of rows (stored) and dw += dy * xhat; x, dy as loaded (any float dtype)."""
    x = x.to(tl.float32)
    dy = dy.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    xhat = x * rstd[:, None]
    wdy = dy * w[None, :]
    # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)) with g = dy * w
    c = tl.sum(wdy * xhat, axis=1) / N
    dx = (wdy - xhat * c[:, None]) * rstd[:, None]
    tl.store(dx_ptr + rows.to(tl.int64)[:, None] * sdx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    return dw + dy * xhat


@triton.jit
def _rms_bwd_load(x_ptr, dy_ptr, start, last, cols, cmask, sx, sdy, BLOCK_M: tl.constexpr):
    """Rows [start, start + BLOCK_M) below `last`: (rows, mask, x, dy) as stored. Inlined by Triton,
    so inside a `tl.range(num_stages=)` loop its loads are still the ones the pipeliner stages."""
    rows = start + tl.arange(0, BLOCK_M)
    mask = (rows < last)[:, None] & cmask[None, :]
    r = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r * sx + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(dy_ptr + r * sdy + cols[None, :], mask=mask, other=0.0)
    return rows, mask, x, dy


@autotune(configs=_configs([1, 2, 4, 8, 16, 32, 64], [4, 8, 16, 32]), key=["N", "STAGES", "per_sm"],
          prune_configs_by={"early_config_prune": _prune_by_tile(1024, 8192, "BLOCK_N", (4, 8))})
@triton.jit
def _rms_norm_bwd(x_ptr, w_ptr, dy_ptr, dx_ptr, dw_part_ptr, M, N, sx, sdy, sdx, eps, rows_per_program,
                  per_sm,  # unused by the code: a tuning key (the variant's programs per SM)
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    if STAGES > 0:
        for start in tl.range(first, last, BLOCK_M, num_stages=STAGES):
            rows, mask, x, dy = _rms_bwd_load(x_ptr, dy_ptr, start, last, cols, cmask, sx, sdy, BLOCK_M)
            dw = _rms_bwd_block(x, dy, w, dw, rows, cols, mask, dx_ptr, sdx, N, eps)
    else:
        for start in range(first, last, BLOCK_M):
            rows, mask, x, dy = _rms_bwd_load(x_ptr, dy_ptr, start, last, cols, cmask, sx, sdy, BLOCK_M)
            dw = _rms_bwd_block(x, dy, w, dw, rows, cols, mask, dx_ptr, sdx, N, eps)
    tl.store(dw_part_ptr + pid.to(tl.int64) * N + cols, tl.sum(dw, axis=0), mask=cmask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [M, N] with unit stride on N (a view whenever possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, bwd_variant=None):
        N = x.shape[-1]
        if weight.shape != (N,):
            raise ValueError(f"rms_norm weight {tuple(weight.shape)} must be ({N},), the last dim of x")
        x2, w = _rows(x), weight.contiguous()
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        M = x2.shape[0]
        if M > 0:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)  # noqa: E731
            _rms_norm_fwd[grid](x2, w, y, M, N, x2.stride(0), y.stride(0), eps, BLOCK_N=triton.next_power_of_2(N))
        ctx.save_for_backward(x2, w)
        ctx.eps, ctx.shape, ctx.weight_dtype = eps, x.shape, weight.dtype
        ctx.bwd_variant = rms_bwd_variant(bwd_variant)  # checked now: a bad name fails before the backward
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        M, N = x2.shape
        dy2 = _rows(dy)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        per_sm, stages = ctx.bwd_variant
        rows_per_program = max(1, triton.cdiv(M, _programs(x2.device, per_sm)))
        programs = max(1, triton.cdiv(M, rows_per_program))
        partial = torch.empty(programs, N, dtype=torch.float32, device=x2.device)
        _rms_norm_bwd[(programs,)](x2, w, dy2, dx, partial, M, N, x2.stride(0), dy2.stride(0), dx.stride(0),
                                   ctx.eps, rows_per_program, per_sm, BLOCK_N=triton.next_power_of_2(N), STAGES=stages)
        dw = partial.sum(0).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None, None


def rms_norm_triton(x, weight, eps=1e-6, bwd_variant=None):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim (fp32 math), in x's dtype.

    `bwd_variant`: a key of RMS_BWD_VARIANTS (default: $SEQPAR_RMS_BWD, else RMS_BWD_DEFAULT)."""
    if x.shape[-1] > MAX_NORM_DIM:
        raise ValueError(f"rms_norm_triton holds a row in registers: last dim {x.shape[-1]} > {MAX_NORM_DIM}; "
                         "use torch.nn.functional.rms_norm (kernels.dispatch does)")
    return TritonRMSNorm.apply(x, weight, eps, bwd_variant)


# ------------------------------------------------------------------------------------ RoPE

@autotune(configs=_configs([1, 2, 4, 8, 16, 32, 64, 128], [4, 8, 16]), key=["HALF"],
          prune_configs_by={"early_config_prune": _prune_by_tile(1024, 4096, "BLOCK_D", (4, 8))})
@triton.jit
def _rotary(x_ptr, cos_ptr, sin_ptr, y_ptr, R, S, H, HALF, sxb, sxs, sxh, syb, sys, syh, scb, scs, ssb, sss,
            INVERSE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # row = (b * S + s) * H + h; int32 division (the host checks R < 2^31), int64 offsets
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (d < HALF)[None, :]
    h = (rows % H).to(tl.int64)
    token = rows // H
    s = (token % S).to(tl.int64)
    b = (token // S).to(tl.int64)
    xo = (b * sxb + s * sxs + h * sxh)[:, None] + d[None, :]
    yo = (b * syb + s * sys + h * syh)[:, None] + d[None, :]
    cos = tl.load(cos_ptr + (b * scb + s * scs)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + (b * ssb + s * sss)[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of a rotation is the rotation by -angle
        sin = -sin
    x1 = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + yo, (x1 * cos - x2 * sin).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + yo + HALF, (x2 * cos + x1 * sin).to(y_ptr.dtype.element_ty), mask=mask)


def _table(t, B, S, half):
    """cos or sin as [B, S, D/2] (broadcast views, stride 0 where shared) with unit last stride."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return torch.broadcast_to(t, (B, S, half))


def _rotate(x, cos, sin, inverse):
    B, S, H, D = x.shape
    half = D // 2
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((B, S, H, D), dtype=x.dtype, device=x.device)
    R = B * S * H
    if R == 0:
        return y
    if R >= 2 ** 31:
        raise ValueError(f"apply_rotary_triton indexes rows in int32: B*S*H = {R} rows is too many; split the batch")
    grid = lambda meta: (triton.cdiv(R, meta["BLOCK_M"]),)  # noqa: E731
    _rotary[grid](x, cos, sin, y, R, S, H, half, *x.stride()[:3], *y.stride()[:3], *cos.stride()[:2],
                  *sin.stride()[:2], INVERSE=inverse, BLOCK_D=triton.next_power_of_2(half))
    return y


class TritonRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, True), None, None


def apply_rotary_triton(x, cos, sin):
    """Rotate-half RoPE on x `[B, S, H, D]` with cos, sin `[S, D/2]` or `[B, S, D/2]` (no grad into cos/sin)."""
    if x.dim() != 4:
        raise ValueError(f"apply_rotary expects x [B, S, H, D], got shape {tuple(x.shape)}")
    B, S, H, D = x.shape
    half = D // 2
    if cos.shape[-1] != half or 2 * half != D:
        raise ValueError(f"cos/sin last dim {cos.shape[-1]} must be half of head dim {D}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("apply_rotary_triton gives no gradient into cos/sin; use the reference for that")
    cos, sin = _table(cos, B, S, half), _table(sin, B, S, half)
    return TritonRotary.apply(x, cos, sin)
