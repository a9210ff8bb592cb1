"""Flash attention in Triton: forward (optionally merged in place into a running (out, lse)) and
backward, dense rows or packed documents, GQA, causal masks aligned bottom-right.

Layout `[B, S, H, D]` (unit stride on D), q with Hq heads, k/v with Hkv heads (Hq % Hkv == 0;
query head h reads kv head h // (Hq // Hkv), never a repeated copy). Math in fp32, dot operands in
the inputs' dtype; softmax in base 2 with log2(e) folded into the scale (FlashAttention-2, Alg. 1).

Tiles. A program owns one tile of one head: BLOCK_M query rows (forward, dq) or BLOCK_N keys
(dk/dv), and walks the other side in inner blocks. With packed documents a tile never crosses a
document start, so the walk covers only the document's keys (or queries), and in a causal
document only the visible triangle: fully visible inner blocks first without any mask, then the
few diagonal ones with the mask. The tile table (document, start) is built on the device from
cu_seqlens with a handful of torch ops (no host sync; its length is bounded by tokens / block +
documents), and sorted by work, longest first, so that short tiles fill the tail of the grid.

Loads. On sm_90 and later the inner blocks (k, v in the forward and dq kernels, q, dout in the
dk/dv kernel) come through TMA descriptors over the program's document (`_rows_desc`, made on the
device; kernels/tma.py), elsewhere and with SEQPAR_TMA=0 through masked pointers. On one H100
(2026-11-27, docs/benchmarks/2026-11-27-gpu-15th/call2) TMA made causal fwd+bwd 4-10% faster in
every case measured: dense 16k, 32 heads of 128, 386 -> 403 TFLOP/s; packed 64k 328 -> 360;
llama_1b's heads (32/8 of 64) packed 64k 274 -> 291, one piece over a prefix 149 -> 160.

Causal alignment: in a document with Lq queries and Lk keys, query j sees keys n <= j + Lk - Lq.
A row that sees no key gets out = 0 and lse = -inf (the neutral element of a merge).

Autotuning is keyed on (head dim, causal, packed, merge, bucketed token count, TMA) and the dtypes,
never on document lengths or counts, so changing packed batches never re-tune.

Backward (FlashAttention-2, Alg. 2) from a given (out, lse), which may be the merged ones of a
larger attention (ring attention): delta = rowsum(dout * out) - dlse, dS = P * (dP - delta).
Two kernels and no atomics: dk/dv per key tile (looping over the query heads of its kv group, so
GQA sums in registers), dq per query tile.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from seqpar.kernels.autotune import autotune
from seqpar.kernels.tma import use_tma

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# what kernels may read of module globals: constexprs only
_LOG2E_C = tl.constexpr(LOG2E)
_LN2_C = tl.constexpr(LN2)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def table_blocks(head_dim: int) -> tuple[int, int]:
    """(query tile, key tile) of packed documents, fixed since the tile table is built before the
    launch (dense rows let the autotuner pick the owned block too). The dk/dv kernel holds k, v,
    dk, dv of its key tile live: 64 keys keep that within the registers at D = 128; at D <= 64, 128
    keys fit, and each of the two warpgroups then owns 64 keys (with 64 only, each gets half of
    every inner block: wgmma tiles of 32 columns)."""
    if _interpreting():
        return 32, 32
    return _FWD_OPTIONS[0][0], (128 if head_dim <= 64 else 64)


def _configs(own, inner, options, extra=()):
    """Configs over (owned block, inner block, warps, stages); one small one in the interpreter.
    SEQPAR_FLASH_TUNE=0 (read at import) keeps the first of each owned block size, which the prune
    narrows to one (`_prune_for`): tests that compile many variants then skip the tuning runs."""
    if _interpreting():
        return [triton.Config({own: 32, inner: 16, **{name: True for name in extra}}, num_warps=4, num_stages=1)]
    if not _tuning():
        first = {}
        for o in options:
            first.setdefault(o[0], o)
        options = list(first.values())
    return [triton.Config({own: a, inner: b, **dict(zip(extra, rest))}, num_warps=w, num_stages=s)
            for a, b, w, s, *rest in options]


def _tuning() -> bool:
    return os.environ.get("SEQPAR_FLASH_TUNE", "1") != "0"


def _prune_for(own):
    def prune(configs, named_args, **kwargs):
        # Packed documents: the tile table fixes the owned block; untuned dense rows take it too.
        # (Constexprs come as keywords.)
        args = {**named_args, **kwargs}
        if not args["VARLEN"] and _tuning():
            return configs
        want = table_blocks(args["HEAD_DIM"])[0 if own == "BLOCK_M" else 1]
        kept = [c for c in configs if c.kwargs[own] == want]
        return kept or [triton.Config({**configs[0].kwargs, own: want}, num_warps=configs[0].num_warps,
                                      num_stages=configs[0].num_stages)]
    return prune


_KEY = ["HEAD_DIM", "CAUSAL", "VARLEN", "LEN_BUCKET", "TMA"]
# token counts vary per batch: no compiled variant per divisibility of a length
_LENGTHS = ["Sq", "Sk", "LEN_BUCKET"]
# SEQPAR_FLASH_TUNE=0 keeps the first option of each owned block size; the prune then leaves the one
# of the tile table's block (`table_blocks`; Triton skips the prune of a single config).
# (owned block, inner block, warps, stages): spill-free at D = 128 on sm_90 (ptxas of triton 3.9,
# checked offline) but the last forward one, there for D = 64 (128-wide inner blocks spill at 128).
# Under triton 3.6 (the GPU machine's; sm_90a ptxas, 2026-11-26) the dk/dv kernel sits at 255
# registers in every option and some spill: (64, 32, 4, 3) 4 B dense / 44 B packed, (128, 64, 8, 3)
# 120 / 188 B, (128, 32, 4, 3) 1.5 / 1.9 KB, (128, 64, 8, 2, SPLIT) 0 / 144 B; forward and dq none
# (the forward's (128, 128, 8, 3): 4 B packed).
_FWD_OPTIONS = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 3)]
_DQ_OPTIONS = [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)]
# dk/dv: (owned key block, inner query block, warps, stages, SPLIT); the first of each key block is
# the untuned pick (64 keys at D = 128, 128 at D <= 64). At D = 64 with TMA loads (one H100, 32/8 heads,
# docs/benchmarks/2026-11-27-gpu-15th/call2, 12 configs) the last one led: packed 64k 9.15 ms, one
# piece over a prefix 19.1, against 9.51 / 19.4 for (128, 32, 4, 3) and 11.3-39 for the rest.
_DKDV_OPTIONS = [(64, 64, 8, 3, False), (64, 32, 4, 3, False), (128, 64, 8, 3, False), (64, 64, 8, 3, True),
                 (128, 32, 4, 3, False), (128, 64, 8, 2, True), (128, 32, 4, 3, True)]

assert _DQ_OPTIONS[0][0] == _FWD_OPTIONS[0][0], "dq and the forward share the query tile table"


@triton.jit
def _tile(tiles_ptr, cu_q_ptr, cu_k_ptr, Sq, Sk, pid, OWN: tl.constexpr, OWN_Q: tl.constexpr,
          CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """(first token of the document in q and k, Lq, Lk, start of the owned tile in the document)
    of tile `pid` (a table entry, or the pid-th tile in work order of dense rows).

    Unused table entries (doc < 0) come back with Lq = Lk = 0: every loop is empty, every store masked.
    """
    if VARLEN:
        doc = tl.load(tiles_ptr + 2 * pid)
        start = tl.load(tiles_ptr + 2 * pid + 1)
        used = (doc >= 0).to(tl.int32)
        doc = tl.maximum(doc, 0)
        q0 = tl.load(cu_q_ptr + doc)
        k0 = tl.load(cu_k_ptr + doc)
        Lq = (tl.load(cu_q_ptr + doc + 1) - q0) * used
        Lk = (tl.load(cu_k_ptr + doc + 1) - k0) * used
    else:
        q0 = pid * 0  # a tensor, not a constant, like the packed branch's
        k0 = pid * 0
        Lq = Sq + q0
        Lk = Sk + k0
        own_len = Sq if OWN_Q else Sk
        n_tiles = tl.cdiv(own_len, OWN)
        # causal: the longest query tiles (the last ones) and key tiles (the first ones) go first
        if CAUSAL and OWN_Q:
            start = (n_tiles - 1 - pid) * OWN
        else:
            start = pid * OWN
    return q0, k0, Lq, Lk, start


@triton.jit
def _rows_desc(base, rows, heads, s_row, s_head, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A TMA descriptor over one document's rows of every head ([rows, heads, D] from `base`, its
    first row): a block past the document reads zeros, so loads need no mask."""
    return tl.make_tensor_descriptor(base, shape=[tl.maximum(rows, 1), heads, HEAD_DIM], strides=[s_row, s_head, 1],
                                     block_shape=[BLOCK, 1, HEAD_DIM])


@triton.jit
def _load_rows(base, desc, row0, head, rows, rmask, s_row, offs_d, TMA: tl.constexpr):
    """Rows row0 + rows of one head (`base` at its first row and head, or `desc` at its document)."""
    if TMA:  # (an if/else: the compiler visits code after a constexpr branch's return)
        x = desc.load([row0, head, 0]).reshape(rows.shape[0], offs_d.shape[0])
    else:
        x = tl.load(base + rows[:, None].to(tl.int64) * s_row + offs_d[None, :], mask=rmask[:, None], other=0.0)
    return x


@triton.jit
def _kv_block(k_base, v_base, sks, svs, n0, cols, kmask, offs_d, TMA: tl.constexpr):
    """Keys and values n0 + offs of the program's document and head: `k_base`, `v_base` at its first
    row (or, TMA, descriptors over its rows, `_rows_desc` with one head)."""
    k = _load_rows(k_base, k_base, n0, 0, cols, kmask, sks, offs_d, TMA)
    v = _load_rows(v_base, v_base, n0, 0, cols, kmask, svs, offs_d, TMA)
    return k, v


@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, sks, svs, n0, offs_m, offs_n, offs_d, Lk, diag, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
               TMA: tl.constexpr):
    cols = n0 + offs_n
    kmask = cols < Lk
    k, v = _kv_block(k_base, v_base, sks, svs, n0, cols, kmask, offs_d, TMA)
    s = tl.dot(q, tl.trans(k.to(DOT)), input_precision=PRECISION) * qk_scale
    if MASK:
        visible = kmask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASK:  # a row without a visible key so far: exp2(-inf - 0) = 0, never exp2(nan)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(DOT), v.to(DOT), acc=acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@autotune(configs=_configs("BLOCK_M", "BLOCK_N", _FWD_OPTIONS), key=_KEY + ["MERGE"],
          prune_configs_by={"early_config_prune": _prune_for("BLOCK_M")}, restore_value=["out_ptr", "lse_ptr"])
@triton.jit(do_not_specialize=_LENGTHS)
def _attn_fwd(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, tiles_ptr, cu_q_ptr, cu_k_ptr,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh, sls,
              Sq, Sk, group, qk_scale, LEN_BUCKET,
              HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, MERGE: tl.constexpr,
              DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q0, k0, Lq, Lk, m0 = _tile(tiles_ptr, cu_q_ptr, cu_k_ptr, Sq, Sk, tile, BLOCK_M, True, CAUSAL, VARLEN)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (q0 + offs_m).to(tl.int64)
    rmask = offs_m < Lq
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], mask=rmask[:, None], other=0.0)
    q = q.to(DOT)
    hk = h // group
    k_base = k_ptr + b * skb + hk * skh + k0.to(tl.int64) * sks
    v_base = v_ptr + b * svb + hk * svh + k0.to(tl.int64) * svs
    if TMA:
        k_base = _rows_desc(k_base, Lk, 1, sks, skh, BLOCK_N, HEAD_DIM)
        v_base = _rows_desc(v_base, Lk, 1, svs, svh, BLOCK_N, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diag = Lk - Lq
    if CAUSAL:
        # blocks every row of the tile sees in full, then the diagonal ones up to the last row's limit
        n_full = tl.maximum(m0 + diag + 1, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag, 0), Lk)
    else:
        n_full = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    n_full = tl.minimum(n_full, hi)
    for n0 in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, sks, svs, n0, offs_m, offs_n, offs_d, Lk,
                                   diag, qk_scale, False, CAUSAL, DOT, PRECISION, TMA)
    for n0 in range(n_full, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, sks, svs, n0, offs_m, offs_n, offs_d, Lk,
                                   diag, qk_scale, True, CAUSAL, DOT, PRECISION, TMA)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2_C)
    o_ptrs = out_ptr + b * sob + h * soh + rows[:, None] * sos + offs_d[None, :]
    l_ptrs = lse_ptr + b * slb + h * slh + rows * sls
    if MERGE:
        # out <- (out e^lse_old + o e^lse) / (e^lse_old + e^lse), lse <- logaddexp(lse_old, lse)
        lse_old = tl.load(l_ptrs, mask=rmask, other=float("-inf")).to(tl.float32)
        top = tl.maximum(lse_old, lse)
        top = tl.where(top == float("-inf"), 0.0, top)
        w_old = tl.exp(lse_old - top)
        w_new = tl.exp(lse - top)
        total = w_old + w_new
        none = total == 0.0
        total = tl.where(none, 1.0, total)
        out_old = tl.load(o_ptrs, mask=rmask[:, None], other=0.0).to(tl.float32)
        out = (out_old * (w_old / total)[:, None]) + out * (w_new / total)[:, None]
        lse = tl.where(none, float("-inf"), top + tl.log(total))
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    tl.store(l_ptrs, lse.to(lse_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _bwd_prep(out_ptr, do_ptr, lse_ptr, dlse_ptr, delta_ptr, lse2_ptr, S, H,
              sob, sos, soh, sdb, sds, sdh, slb, slh, sls, sgb, sgh, sgs,
              HEAD_DIM: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK: tl.constexpr):
    """delta = rowsum(dout * out) - dlse; lse in base 2 with +inf for rows without a key, so that
    P = exp2(s - lse2) is 0 there (and on padded rows) without another mask."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < S
    r64 = rows.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    o = tl.load(out_ptr + b * sob + h * soh + r64[:, None] * sos + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + r64[:, None] * sds + offs_d[None, :], mask=rmask[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + b * sgb + h * sgh + r64 * sgs, mask=rmask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + b * slb + h * slh + r64 * sls, mask=rmask, other=0.0).to(tl.float32)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_C)
    dst = (b * H + h) * S + r64
    tl.store(delta_ptr + dst, delta, mask=rmask)
    tl.store(lse2_ptr + dst, lse2, mask=rmask)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, q_desc, do_desc, lse2_ptr, delta_ptr, b, h, q0, Hq, Sq,
                sqb, sqh, sqs, sdb, sdh, sds, m0, offs_m, offs_n, offs_d, Lq, diag, qk_scale,
                MASK: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    rows = m0 + offs_m
    rmask = rows < Lq
    # 64-bit scalar bases, 32-bit offsets inside the block: fewer live registers than 64-bit tiles
    first = (q0 + m0).to(tl.int64)
    q = _load_rows(q_ptr + b * sqb + h * sqh + first * sqs, q_desc, m0, h, offs_m, rmask, sqs, offs_d, TMA).to(DOT)
    do = _load_rows(do_ptr + b * sdb + h * sdh + first * sds, do_desc, m0, h, offs_m, rmask, sds, offs_d,
                    TMA).to(DOT)
    stats = (b * Hq + h) * Sq + first
    lse2 = tl.load(lse2_ptr + stats + offs_m, mask=rmask, other=float("inf"))
    delta = tl.load(delta_ptr + stats + offs_m, mask=rmask, other=0.0)
    # transposed scores [keys, rows]: dk and dv come out of dots without a transpose of the result
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    pt = tl.exp2(st - lse2[None, :])
    if MASK:
        pt = tl.where(offs_n[:, None] <= rows[None, :] + diag, pt, 0.0)
    dv = tl.dot(pt.to(DOT), do, acc=dv, input_precision=PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(DOT), q, acc=dk, input_precision=PRECISION)
    return dk, dv


# restore_value: with ACCUM the destinations are read, so tuning runs must not add into them twice
@autotune(configs=_configs("BLOCK_N", "BLOCK_M", _DKDV_OPTIONS, extra=("SPLIT",)),
          key=_KEY, prune_configs_by={"early_config_prune": _prune_for("BLOCK_N")},
          restore_value=["dk_ptr", "dv_ptr"])
@triton.jit(do_not_specialize=_LENGTHS)
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dk_ptr, dv_ptr, tiles_ptr, cu_q_ptr, cu_k_ptr,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
                   Sq, Sk, Hq, group, qk_scale, sm_scale, LEN_BUCKET,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, ACCUM: tl.constexpr,
                   DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q0, k0, Lq, Lk, n0 = _tile(tiles_ptr, cu_q_ptr, cu_k_ptr, Sq, Sk, tile, BLOCK_N, False, CAUSAL, VARLEN)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = (k0 + offs_n).to(tl.int64)
    kmask = offs_n < Lk
    k = tl.load(k_ptr + b * skb + hk * skh + keys[:, None] * sks + offs_d[None, :], mask=kmask[:, None], other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + keys[:, None] * svs + offs_d[None, :], mask=kmask[:, None], other=0.0)
    k = k.to(DOT)
    v = v.to(DOT)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if TMA:  # over the document's query rows of every head
        q_desc = _rows_desc(q_ptr + b * sqb + q0.to(tl.int64) * sqs, Lq, Hq, sqs, sqh, BLOCK_M, HEAD_DIM)
        do_desc = _rows_desc(do_ptr + b * sdb + q0.to(tl.int64) * sds, Lq, Hq, sds, sdh, BLOCK_M, HEAD_DIM)
    else:
        q_desc = q_ptr
        do_desc = do_ptr
    diag = Lk - Lq
    if CAUSAL:
        # rows j >= n - diag see key n: the first row that sees the tile, and the first row from
        # which every key of the tile is visible (mask-free blocks from there on)
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum(n0 + BLOCK_N - 1 - diag, lo)
        mid = lo + tl.cdiv(mid - lo, BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, Lq)
        mid = tl.minimum(mid, Lq)
    else:
        lo = Lq * 0
        mid = lo
    # Flat loops over (query head of the group, row block): nested loops cost ~40 registers of
    # pipelining state, which at D = 128 tips the kernel into spills. SPLIT: mask-free blocks in a
    # loop of their own (less math, more registers: at D = 128 it spills unless the tiles are
    # small), else one loop that always masks.
    if SPLIT:
        n_masked = tl.cdiv(mid - lo, BLOCK_M)
        n_full = tl.cdiv(Lq - mid, BLOCK_M)
    else:
        n_masked = tl.cdiv(Lq - lo, BLOCK_M)
        n_full = n_masked * 0
    for it in range(0, group * n_masked):
        g = it // n_masked
        m0 = lo + (it - g * n_masked) * BLOCK_M
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, q_desc, do_desc, lse2_ptr, delta_ptr, b, hk * group + g,
                             q0, Hq, Sq, sqb, sqh, sqs, sdb, sdh, sds, m0, offs_m, offs_n, offs_d, Lq, diag,
                             qk_scale, CAUSAL, DOT, PRECISION, TMA)
    for it in range(0, group * n_full):
        g = it // n_full
        m0 = mid + (it - g * n_full) * BLOCK_M
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, q_desc, do_desc, lse2_ptr, delta_ptr, b, hk * group + g,
                             q0, Hq, Sq, sqb, sqh, sqs, sdb, sdh, sds, m0, offs_m, offs_n, offs_d, Lq, diag,
                             qk_scale, False, DOT, PRECISION, TMA)
    dk_ptrs = dk_ptr + b * sdkb + hk * sdkh + keys[:, None] * sdks + offs_d[None, :]
    dv_ptrs = dv_ptr + b * sdvb + hk * sdvh + keys[:, None] * sdvs + offs_d[None, :]
    dk = dk * sm_scale
    if ACCUM:  # one program owns a key row: a read-add-store needs no atomics
        dk += tl.load(dk_ptrs, mask=kmask[:, None], other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=kmask[:, None], other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kmask[:, None])
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _dq_block(dq, q, do, lse2, delta, k_base, v_base, sks, svs, n0, offs_m, offs_n, offs_d, Lk, diag, qk_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr):
    cols = n0 + offs_n
    kmask = cols < Lk
    k, v = _kv_block(k_base, v_base, sks, svs, n0, cols, kmask, offs_d, TMA)
    k = k.to(DOT)
    v = v.to(DOT)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASK:
        visible = kmask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(DOT), k, acc=dq, input_precision=PRECISION)


@autotune(configs=_configs("BLOCK_M", "BLOCK_N", _DQ_OPTIONS), key=_KEY,
          prune_configs_by={"early_config_prune": _prune_for("BLOCK_M")})
@triton.jit(do_not_specialize=_LENGTHS)
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr, dq_ptr, tiles_ptr, cu_q_ptr, cu_k_ptr,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdb, sds, sdh, sdqb, sdqs, sdqh,
                 Sq, Sk, Hq, group, qk_scale, sm_scale, LEN_BUCKET,
                 HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q0, k0, Lq, Lk, m0 = _tile(tiles_ptr, cu_q_ptr, cu_k_ptr, Sq, Sk, tile, BLOCK_M, True, CAUSAL, VARLEN)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = (q0 + offs_m).to(tl.int64)
    rmask = offs_m < Lq
    q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqs + offs_d[None, :], mask=rmask[:, None], other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + rows[:, None] * sds + offs_d[None, :], mask=rmask[:, None], other=0.0)
    q = q.to(DOT)
    do = do.to(DOT)
    stats = (b * Hq + h) * Sq + rows
    lse2 = tl.load(lse2_ptr + stats, mask=rmask, other=float("inf"))
    delta = tl.load(delta_ptr + stats, mask=rmask, other=0.0)
    hk = h // group
    k_base = k_ptr + b * skb + hk * skh + k0.to(tl.int64) * sks
    v_base = v_ptr + b * svb + hk * svh + k0.to(tl.int64) * svs
    if TMA:
        k_base = _rows_desc(k_base, Lk, 1, sks, skh, BLOCK_N, HEAD_DIM)
        v_base = _rows_desc(v_base, Lk, 1, svs, svh, BLOCK_N, HEAD_DIM)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    diag = Lk - Lq
    if CAUSAL:
        n_full = tl.maximum(m0 + diag + 1, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + diag, 0), Lk)
    else:
        n_full = Lk // BLOCK_N * BLOCK_N
        hi = Lk
    n_full = tl.minimum(n_full, hi)
    for n0 in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, sks, svs, n0, offs_m, offs_n, offs_d, Lk, diag,
                       qk_scale, False, CAUSAL, DOT, PRECISION, TMA)
    for n0 in range(n_full, hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, k_base, v_base, sks, svs, n0, offs_m, offs_n, offs_d, Lk, diag,
                       qk_scale, True, CAUSAL, DOT, PRECISION, TMA)
    tl.store(dq_ptr + b * sdqb + h * sdqh + rows[:, None] * sdqs + offs_d[None, :],
             (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=rmask[:, None])


# ---------------------------------------------------------------- launchers


def tile_table(cu_own, cu_other, block: int, n_own: int, causal: bool, own_is_q: bool):
    """int32 [n_max, 2] of (document, first row of the tile in it), longest work first; -1 pads.

    Built on the device from the boundaries alone (no host sync): n_max = n_own // block + docs
    bounds the tile count, since each document wastes less than one tile."""
    cu_own, cu_other = cu_own.long(), cu_other.long()
    n_docs = cu_own.numel() - 1
    own, other = cu_own[1:] - cu_own[:-1], cu_other[1:] - cu_other[:-1]
    per_doc = (own + block - 1) // block
    ends = torch.cumsum(per_doc, 0)
    g = torch.arange(n_own // block + n_docs, device=cu_own.device)
    doc = torch.searchsorted(ends, g, right=True)
    used = doc < n_docs
    doc = doc.clamp(max=n_docs - 1)
    start = (g - ends[doc] + per_doc[doc]) * block
    if not causal:
        work = other[doc]
    elif own_is_q:  # keys visible to the tile's last row
        work = torch.minimum(other[doc], other[doc] - own[doc] + start + block).clamp(min=0)
    else:  # rows that see the tile's first key
        work = (other[doc] - (start - (own[doc] - other[doc])).clamp(min=0)).clamp(min=0)
    work = torch.where(used, work, -1)
    order = torch.argsort(work, descending=True)
    return torch.stack([torch.where(used, doc, -1), start], 1)[order].to(torch.int32).contiguous()


def _bucket(tokens: int) -> int:
    """Tuning key of a token count: powers of 4 from 1k to 256k (a new bucket, not a new length, re-tunes)."""
    return min(max(1024, 4 ** math.ceil(math.log(max(tokens, 1), 4))), 1 << 18)


def _dot(dtype):
    # The interpreter mis-multiplies 16-bit floats (numpy holds bf16 as uint16): fp32 operands there.
    if dtype == torch.float32 or _interpreting():
        return tl.float32, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), "tf32"  # flag unused for 16-bit


def _unit(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, k, v, cu_q, cu_k):
    B, Sq, Hq, D = q.shape
    if k.shape[:2] != v.shape[:2] or k.shape[0] != B or k.shape[2] != v.shape[2] or Hq % k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: need [B, S, H, D] with "
                         "k, v of one shape and query heads a multiple of key/value heads")
    if k.shape[3] != D or v.shape[3] != D or D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"the Triton flash kernel takes one head dim, a power of two in [16, 256]; got q {D}, "
                         f"k {k.shape[3]}, v {v.shape[3]} (use the reference: SEQPAR_KERNELS=reference)")
    if (cu_q is None) != (cu_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together")
    if cu_q is not None and (B != 1 or cu_q.numel() != cu_k.numel() or cu_q.numel() < 2):
        raise ValueError(f"packed documents need B = 1 and as many q as k boundaries (>= 2); got B = {B}, "
                         f"{cu_q.numel()} and {cu_k.numel()} boundaries")


def _cu(cu_seqlens, cu_seqlens_q, cu_seqlens_k, device):
    if cu_seqlens is not None:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("pass either cu_seqlens or cu_seqlens_q/cu_seqlens_k, not both")
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    if cu_seqlens_q is None:
        return None, None
    as_int = lambda c: torch.as_tensor(c, device=device).to(torch.int32).contiguous()  # noqa: E731
    return as_int(cu_seqlens_q), as_int(cu_seqlens_k)


def _grid(table, tokens, rows, heads, block_key):
    """(tiles, heads, rows): a packed batch's tiles are its table's entries."""
    if table is not None:
        return (table.shape[0], heads, 1)
    return lambda meta: (triton.cdiv(tokens, meta[block_key]), heads, rows)


def _forward_into(q, k, v, out, lse, *, causal, cu_q, cu_k, scale, merge, q_table=None):
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    varlen = cu_q is not None
    if varlen and q_table is None:
        q_table = tile_table(cu_q, cu_k, table_blocks(D)[0], Sq, causal, True)
    dummy = cu_q if varlen else torch.zeros(2, dtype=torch.int32, device=q.device)
    dot, precision = _dot(q.dtype)
    _attn_fwd[_grid(q_table if varlen else None, Sq, B, Hq, "BLOCK_M")](
        q, k, v, out, lse, q_table if varlen else dummy, dummy, cu_k if varlen else dummy,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        Sq, Sk, Hq // Hkv, scale * LOG2E, _bucket(B * Sq),
        HEAD_DIM=D, CAUSAL=bool(causal), VARLEN=varlen, MERGE=merge, DOT=dot, PRECISION=precision,
        TMA=use_tma(k, v))  # (q itself is loaded through a pointer)
    return q_table


def attention_forward(q, k, v, *, causal=True, cu_seqlens_q=None, cu_seqlens_k=None, softmax_scale=None, out=None):
    """(out `[B, Sq, Hq, D]` in q's dtype, lse `[B, Hq, Sq]` fp32, the query tile table or None).

    `out`: where to store the output (q's shape and dtype, any strides with unit stride on D)."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    q, k, v = _unit(q), _unit(k), _unit(v)
    B, Sq, Hq, D = q.shape
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    given = out
    if out is None or out.stride(-1) != 1:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.shape[1] == 0:  # no launch: out = 0, lse = -inf
        table = None
        out.zero_(), lse.fill_(float("-inf"))
    else:
        table = _forward_into(q, k, v, out, lse, causal=causal, cu_q=cu_seqlens_q, cu_k=cu_seqlens_k, scale=scale,
                              merge=False)
    if given is not None and given is not out:  # D not unit-strided: the kernel stored into a buffer
        from seqpar.kernels.flash_attn import _deliver
        out = _deliver(given, out, False)
    return out, lse, table


def attention_backward(dout, q, k, v, out, lse, *, causal=True, cu_seqlens_q=None, cu_seqlens_k=None,
                       softmax_scale=None, dlse=None, q_table=None, dq=None, dk=None, dv=None, accumulate=False):
    """(dq, dk, dv) in the inputs' dtypes; `out`, `lse` may be the merged ones of a larger attention.

    `dq`, `dk`, `dv`: where to store them (the inputs' shapes and dtypes, any strides); the kernels
    store there directly when D has unit stride. `accumulate`: add into dk and dv."""
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    given = (dq, dk, dv)
    dout, q, k, v, out = (_unit(t) for t in (dout, q, k, v, out))
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    direct = [d is not None and d.stride(-1) == 1 for d in given]
    # a destination the kernels cannot store into (D strided) takes its result from a buffer,
    # overwritten or added after the launch
    accum = accumulate and direct[1] and direct[2]
    dq, dk, dv = (d if ok and (i == 0 or accum or not accumulate) else torch.empty_like(t)
                  for i, (d, ok, t) in enumerate(zip(given, direct, (q, k, v))))
    if q.numel() == 0 or Sk == 0:
        dq.zero_()
        if not accum:
            dk.zero_(), dv.zero_()
        return _into(given, (dq, dk, dv), accumulate)
    delta = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    g = lse if dlse is None else dlse
    prep_block = 64
    _bwd_prep[(triton.cdiv(Sq, prep_block), Hq, B)](
        out, dout, lse, g, delta, lse2, Sq, Hq, out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        g.stride(0), g.stride(1), g.stride(2), HEAD_DIM=D, HAS_DLSE=dlse is not None, BLOCK=prep_block)
    varlen = cu_seqlens_q is not None
    dummy = cu_seqlens_q if varlen else torch.zeros(2, dtype=torch.int32, device=q.device)
    block_q, block_k = table_blocks(D)
    k_table = tile_table(cu_seqlens_k, cu_seqlens_q, block_k, Sk, causal, False) if varlen else None
    if varlen and q_table is None:
        q_table = tile_table(cu_seqlens_q, cu_seqlens_k, block_q, Sq, causal, True)
    dot, precision = _dot(q.dtype)
    common = dict(HEAD_DIM=D, CAUSAL=bool(causal), VARLEN=varlen, DOT=dot, PRECISION=precision,
                  TMA=use_tma(q, k, v, dout))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _attn_bwd_dkdv[_grid(k_table, Sk, B, Hkv, "BLOCK_N")](
        q, k, v, dout, lse2, delta, dk, dv, k_table if varlen else dummy, dummy, cu_seqlens_k if varlen else dummy,
        *strides, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        Sq, Sk, Hq, Hq // Hkv, scale * LOG2E, scale, _bucket(B * Sq), **common, ACCUM=bool(accum))
    _attn_bwd_dq[_grid(q_table, Sq, B, Hq, "BLOCK_M")](
        q, k, v, dout, lse2, delta, dq, q_table if varlen else dummy, dummy, cu_seqlens_k if varlen else dummy,
        *strides, dq.stride(0), dq.stride(1), dq.stride(2),
        Sq, Sk, Hq, Hq // Hkv, scale * LOG2E, scale, _bucket(B * Sq), **common)
    return _into(given, (dq, dk, dv), accumulate)


def _into(given, computed, accumulate):
    """Each given destination holding its result: those the kernels stored into are returned as
    they are; the others take theirs from the package's fallback (copy_, or add_ for dk/dv)."""
    from seqpar.kernels.flash_attn import _deliver
    return tuple(got if dest is None or dest is got else _deliver(dest, got, accumulate and i > 0)
                 for i, (dest, got) in enumerate(zip(given, computed)))


class _FlashAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, cu_q, cu_k, scale):
        out, lse, table = attention_forward(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                            softmax_scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, table)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_q, cu_k, table = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_backward(dout, q, k, v, out, lse, causal=ctx.causal, cu_seqlens_q=cu_q,
                                        cu_seqlens_k=cu_k, softmax_scale=ctx.scale, dlse=dlse, q_table=table)
        return dq, dk, dv, None, None, None, None


def flash_attn_triton(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      softmax_scale=None, return_lse=False, out=None):
    """`seqpar.kernels.flash_attn` in Triton, differentiable through out and lse unless `out` is
    given (then the result is stored there, without autograd)."""
    cu_q, cu_k = _cu(cu_seqlens, cu_seqlens_q, cu_seqlens_k, q.device)
    if out is not None:
        out, lse, _ = attention_forward(q, k, v, causal=bool(causal), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                        softmax_scale=softmax_scale, out=out)
    else:
        out, lse = _FlashAttn.apply(q, k, v, bool(causal), cu_q, cu_k, softmax_scale)
    return (out, lse) if return_lse else out


def flash_attn_backward_triton(dout, q, k, v, out, lse, *, causal=True, cu_seqlens=None, cu_seqlens_q=None,
                               cu_seqlens_k=None, softmax_scale=None, dq=None, dk=None, dv=None, accumulate=False):
    cu_q, cu_k = _cu(cu_seqlens, cu_seqlens_q, cu_seqlens_k, q.device)
    return attention_backward(dout, q, k, v, out, lse, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                              softmax_scale=softmax_scale, dq=dq, dk=dk, dv=dv, accumulate=accumulate)


@torch.no_grad()
def flash_attn_merge_(q, k, v, out, lse, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                      softmax_scale=None):
    """One ring step: attend q to this block's k, v and fold the result into the running
    (out `[B, Sq, Hq, D]`, any float dtype, lse `[B, Hq, Sq]` fp32) in place, inside the kernel's
    epilogue: out <- (out e^lse + o e^l) / (e^lse + e^l), lse <- logaddexp(lse, l). Start from
    out = 0, lse = -inf. Views (strided slices of larger buffers) are fine if D has unit stride.
    No autograd: the caller's own backward uses flash_attn_backward with the final (out, lse)."""
    cu_q, cu_k = _cu(cu_seqlens, cu_seqlens_q, cu_seqlens_k, q.device)
    _check(q, k, v, cu_q, cu_k)
    if out.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]) or out.stride(-1) != 1:
        raise ValueError(f"running out {tuple(out.shape)} / lse {tuple(lse.shape)} must be q's shape "
                         f"{tuple(q.shape)} (unit stride on D) and [B, Hq, Sq]")
    if lse.dtype != torch.float32:
        raise ValueError(f"the running lse must be float32, got {lse.dtype}")
    if q.numel() == 0 or k.shape[1] == 0:
        return out, lse  # no keys: merging lse = -inf changes nothing
    q, k, v = _unit(q), _unit(k), _unit(v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    _forward_into(q, k, v, out, lse, causal=causal, cu_q=cu_q, cu_k=cu_k, scale=scale, merge=True)
    return out, lse


def tune_buckets(heads: int, kv_heads: int, head_dim: int, max_tokens: int, *, dtype=torch.bfloat16,
                 device="cuda", doc_len: int = 4096) -> list[int]:
    """Tunes the causal packed-row kernels (forward and both backward kernels) for every length
    bucket up to `max_tokens` query rows, now rather than at each bucket's first call inside a step.
    A disagg server's Triton call changes bucket with each step's plan (its pieces over a prefix
    come and go), and timing every config of a bucket took 5.6 s on one rank in step 5 while the
    other waited (2 H100, llama_1b, 64k tokens per GPU, wlbllm mix: that step 8.6 s against 1.5).
    The picks stay on disk (`kernels/autotune.py`): a later process on the machine pays nothing.
    Each bucket is tuned on its largest token count, cut into documents of `doc_len`.
    Returns the buckets tuned."""
    buckets = sorted({_bucket(4 ** i) for i in range(5, 10) if _bucket(4 ** i) <= _bucket(max_tokens)})
    for n in buckets:
        cuts = list(range(0, n, doc_len)) + [n]
        cu = torch.tensor(cuts, dtype=torch.int32, device=device)
        q = torch.randn(1, n, heads, head_dim, dtype=dtype, device=device)
        k, v = (torch.randn(1, n, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2))
        out, lse, table = attention_forward(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        attention_backward(torch.randn_like(out), q, k, v, out, lse, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu,
                           q_table=table)
        del q, k, v, out, lse
    return buckets
