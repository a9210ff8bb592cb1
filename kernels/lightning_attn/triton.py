"""Lightning attention in Triton: chunked decayed linear attention (Lightning Attention-2 tiling),
forward and backward, packed documents through `cu_seqlens`, initial and final states.

Two levels of blocking. Chunks of C = 64 tokens run inside one program: a masked decayed
quadratic form within the chunk plus a read of the running state, then the state update
(Qin et al., Lightning Attention-2, 2024). Segments of `seg_len` tokens (a multiple of C; a
segment never crosses a document start) are the unit of parallelism. Three kernels:

  1. `_segment_state`: each segment's own contribution to the state at its end, from zero
     (parallel over segment x head x column block);
  2. `_segment_scan`: per document, the document's own state (from zero) at each boundary
     between two of its segments, a short fp32 scan over the document's segments;
  3. `_segment_output`: per segment, walks its chunks from the entering state (the boundary's
     plus the document's initial state decayed over the tokens before the segment) and writes
     the outputs; a document's last segment also writes the final state (parallel like 1).

Chained (SEQPAR_LIGHTNING_CHAIN=1, `_chained`; plain calls, not LASP-2's exchange), kernel 3 does
1 and 2 itself: each program computes its segment's own contribution, waits for the boundary before
it (a flag its predecessor sets; programs take tickets in the direction of travel, so every program
waited for has started), publishes the boundary after it, then writes its outputs: one launch, and
the state pass's reads beside other segments' output work rather than before all of it. Timed on
one H200 (H=32, D=128, bf16, fwd+bwd; docs/benchmarks/2026-11-28-gpu-30th/call1) it ran slower at
every length: 20.4 / 16.5 Mtok/s at 16 x 4k / 64k against the default's 22.1 / 18.2 (each program
reads its keys and values twice, once for its own state, even where a document has one segment),
and flat (0.94-0.98) only at 1-2k-token segments, at 15.1-16.9. So it stays opt-in.

States are kept only at boundaries inside documents, at most tokens / seg_len of them whatever
the number of documents (not one per chunk, as fla's chunk kernels do), so state traffic stays
small next to q/k/v; the parallelism is (tokens / seg_len) x heads whatever the batch and
document layout, so throughput per token does not depend on S.

All three kernels are written once for a generic triple (x, y, z) and a direction:
    causal:      out_i = a_s * sum_{j<=i} a^(i-j) (x_i.y_j) z_j + a_r * a^(i+1) x_i State
                 State' = a^L State + a_u * sum_j a^(L-1-j) y_j^T z_j          (chunk of L tokens)
    anti-causal: out_j = a_s * sum_{i>=j} a^(i-j) (x_j.y_i) z_i + a_r * a^(L-1-j) x_j State
                 State' = a^L State + a_u * sum_i a^(i+1) y_i^T z_i           (chunks walked backward)
with (a_s, a_r, a_u) the intra, read and update scales. With G_t = dLoss/dM_t and
E = a * G_(first token after the chunk) (or dFinal after a document's last token):
    o  = causal(q, k, v; S)              scales (scale, scale, 1)
    dq = causal(do, v, k; S^T)           scales (scale, scale, 1), S saved by the forward
    dv = anti-causal(k, q, do; E)        scales (scale, 1, scale)
    dk = anti-causal(v, do, q; E^T)      scales (scale, 1, scale)
and d(initial_state) = E before a document's first token, which the dv pass writes.

Boundaries hold a document's own state from zero; the output pass adds the state entering the
document, decayed over the tokens before the segment. So with an `exchange` (LASP-2), whose
entering states are not known when the kernel starts, nothing runs twice: kernels 1 and 2 also
fold each document's last segment in (its own exit state), `exchange.forward` turns those into
entering states (the cp group's scan) and kernel 3 starts from them; backward posts
`exchange.backward` before the dq pass, which does not need its answer. Over a plain call this
adds the last segments' states (one segment per document).
A transposed state is the same buffer read with swapped strides.

Every decay factor is exp of a non-positive number, so nothing overflows; padded rows get
weight 0 through `tl.where`, never through exp of a positive number times zero.
Math is fp32; dot operands are bf16 for 16-bit inputs (bf16 even for fp16: a state of long
documents without decay can exceed fp16's range) and fp32 (IEEE, not tf32) for fp32 inputs.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary
import triton.language as tl

from seqpar.kernels.autotune import autotune
from seqpar.kernels.launch import Launch
from seqpar.kernels.tma import use_tma

CHUNK = 64
# Segments: long enough that the boundary states (fp32, Dk x Dv per head) cost little memory
# traffic next to q/k/v (2*Dv/seg_len of q's bytes) and that rows of up to 16k skip the state pass,
# short enough to fill the SMs (`segment_length`).
MIN_SEGMENT, MAX_SEGMENT = 256, 16384
SCAN_ROWS = 16
MAX_Z_SPLIT = 2  # the column blocks per program of `_segment_output`'s configs (its chain's flags)
CHAIN_ENV = "SEQPAR_LIGHTNING_CHAIN"
# TMA loads of the chunks (kernels/tma.py) on sm_90+: 2-6 % faster fwd+bwd at every length on H100
# and H200 (2026-11-27-gpu-16th calls 1, 2), so on by default (SEQPAR_TMA=0 turns them off)
TMA_DEFAULT = True
# segment table columns: start, end, document, boundary before (-1: first of its document),
# boundary after (-1: last of its document), tokens between the document's start and the segment's
# start, tokens between the segment's end and the document's end
SEG_COLS = 7


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(split_options):
    # Few configs, tuned once per (Dy, Dz, dtypes): the key holds no length, no token count and no
    # document count, so packed batches of changing lengths never trigger a re-tune.
    configs = [triton.Config({"Z_SPLIT": z}, num_warps=w, num_stages=s) for z, w, s in split_options]
    return configs[:1] if _interpreting() else configs


def _prune(configs, named_args, **kwargs):
    # A column block narrower than 16 cannot feed tl.dot. (Constexprs come as keywords.)
    block = {**named_args, **kwargs}["BLOCK_DZ"]
    kept = [c for c in configs if block // c.kwargs["Z_SPLIT"] >= 16]
    return kept or configs[:1]


@triton.jit
def _chunk_weights(lam, rows, L, REVERSE: tl.constexpr):
    """Per-row decays of one chunk: for the state read, and for the state update."""
    pos = rows.to(tl.float32)
    valid = rows < L
    before = pos + 1.0  # tokens from the chunk's entering state through this row
    after = tl.maximum(L.to(tl.float32) - 1.0 - pos, 0.0)  # tokens after this row in the chunk
    if REVERSE:
        read, write = tl.exp(lam * after), tl.exp(lam * before)
    else:
        read, write = tl.exp(lam * before), tl.exp(lam * after)
    return tl.where(valid, read, 0.0), tl.where(valid, write, 0.0)


@triton.jit
def _segment_info(seg_ptr, seg, REVERSE: tl.constexpr):
    """start, end, document, and the boundaries the state comes from / goes to (-1: none)."""
    row = seg_ptr + seg * 7  # SEG_COLS
    start, end, doc = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    came_from, goes_to = tl.load(row + 3), tl.load(row + 4)
    if REVERSE:
        came_from, goes_to = tl.load(row + 4), tl.load(row + 3)
    return start, end, doc, came_from, goes_to


@triton.jit
def _segment_offset(seg_ptr, seg, REVERSE: tl.constexpr):
    """Tokens between the document's edge and the segment, in the direction of travel: how much
    the state entering the document has decayed when it enters the segment."""
    col = 5
    if REVERSE:
        col = 6
    return tl.load(seg_ptr + seg * 7 + col)


@triton.jit
def _segment_desc(ptr, start, end, H, s_t, s_h, D: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    """A TMA descriptor over one segment's tokens of every head ([end - start, H, D]): a chunk
    past the segment's end (or columns past D) reads zeros."""
    return tl.make_tensor_descriptor(ptr + start.to(tl.int64) * s_t, shape=[tl.maximum(end - start, 1), H, D],
                                     strides=[s_t, s_h, 1], block_shape=[C, 1, BLOCK])


@triton.jit
def _load_chunk(ptr, desc, tok, row, h, s_t, s_h, cols, col0, valid, cmask, TMA: tl.constexpr):
    """One chunk's rows `tok` (`row` from the segment's start) of head h, columns `cols` (from col0)."""
    if TMA:
        x = desc.load([row, h, col0]).reshape(tok.shape[0], cols.shape[0])
    else:
        x = tl.load(ptr + tok[:, None] * s_t + h * s_h + cols[None, :], mask=valid[:, None] & cmask[None, :],
                    other=0.0)
    return x


@triton.jit
def _chunk_at(start, end, c, n_chunks, rows, C: tl.constexpr, REVERSE: tl.constexpr):
    """The segment's c-th chunk in the direction of travel: its first token, its length, which of
    `rows` it holds, and their token indices."""
    if REVERSE:
        t0 = start + (n_chunks - 1 - c) * C
    else:
        t0 = start + c * C
    L = tl.minimum(end - t0, C)
    return t0, L, rows < L, (t0 + rows).to(tl.int64)


@triton.jit
def _local_state(y_ptr, z_ptr, y_src, z_src, start, end, n_chunks, h, lam, update_scale, syt, syh, szt, szh,
                 rows, dy, dz, z0, ymask, zmask, state, C: tl.constexpr, REVERSE: tl.constexpr,
                 DOT: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr):
    """`state` carried through the segment's first `n_chunks` chunks in the direction of travel
    (from zero: the segment's own contribution to the state at its end)."""
    for c in range(0, n_chunks):
        t0, L, valid, tok = _chunk_at(start, end, c, n_chunks, rows, C, REVERSE)
        y = _load_chunk(y_ptr, y_src, tok, t0 - start, h, syt, syh, dy, 0, valid, ymask, TMA).to(DOT)
        z = _load_chunk(z_ptr, z_src, tok, t0 - start, h, szt, szh, dz, z0, valid, zmask, TMA).to(DOT)
        _, write = _chunk_weights(lam, rows, L, REVERSE)
        z_write = z * (write * update_scale).to(DOT)[:, None]
        state = tl.dot(tl.trans(y), z_write, acc=state * tl.exp(lam * L.to(tl.float32)), input_precision=PRECISION)
    return state


@autotune(configs=_configs([(1, 8, 2), (2, 8, 2), (2, 4, 2)]), key=["DY", "DZ", "TMA", "CHAIN"],
          prune_configs_by={"early_config_prune": _prune}, reset_to_zero=["flag_ptr"])
@triton.jit
def _segment_output(x_ptr, y_ptr, z_ptr, out_ptr, bound_ptr, edge_in_ptr, edge_out_ptr, seg_ptr, lam_ptr, flag_ptr,
                    sxt, sxh, syt, syh, szt, szh, sot, soh, sbn, sbh, sby, sbz, sen, seh, sey, sez,
                    H, n_segs, intra_scale, read_scale, update_scale,
                    DY: tl.constexpr, DZ: tl.constexpr, BLOCK_DY: tl.constexpr, BLOCK_DZ: tl.constexpr,
                    C: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                    HAS_EDGE_IN: tl.constexpr, STORE_EDGE_OUT: tl.constexpr, TMA: tl.constexpr,
                    CHAIN: tl.constexpr, Z_SPLIT: tl.constexpr):
    # One program: one segment, one head, one block of z's columns. Neighbouring programs share
    # the segment (and its x, y tiles through L2) and differ in column block, then head.
    # edge_in: the state before a document (initial state; dFinal going backward), edge_out: the
    # state after it (final state; d initial_state going backward), both per document.
    # CHAIN: the boundary states are made here, not by kernels 1-2 (`_chained`): a program takes
    # a ticket (flag_ptr[0]) instead of its program id, so segments are taken in the direction of
    # travel and every program it waits for holds an earlier ticket, already running (no deadlock);
    # it computes its own segment's contribution, waits for the boundary before it (flag_ptr[1:],
    # per boundary, head and column block), publishes the boundary after it, then writes outputs.
    pid = tl.program_id(0)
    if CHAIN:
        pid = tl.atomic_add(flag_ptr, 1)
    zb = pid % Z_SPLIT
    h = (pid // Z_SPLIT) % H
    seg = pid // (Z_SPLIT * H)
    if CHAIN and REVERSE:
        seg = n_segs - 1 - seg
    start, end, doc, came_from, goes_to = _segment_info(seg_ptr, seg, REVERSE)
    lam = tl.load(lam_ptr + h).to(tl.float32)

    rows = tl.arange(0, C)
    dy = tl.arange(0, BLOCK_DY)
    dz = zb * (BLOCK_DZ // Z_SPLIT) + tl.arange(0, BLOCK_DZ // Z_SPLIT)
    ymask, zmask = dy < DY, dz < DZ
    z0 = zb * (BLOCK_DZ // Z_SPLIT)
    if TMA:
        x_src = _segment_desc(x_ptr, start, end, H, sxt, sxh, DY, C, BLOCK_DY)
        y_src = _segment_desc(y_ptr, start, end, H, syt, syh, DY, C, BLOCK_DY)
        z_src = _segment_desc(z_ptr, start, end, H, szt, szh, DZ, C, BLOCK_DZ // Z_SPLIT)
        o_dst = _segment_desc(out_ptr, start, end, H, sot, soh, DZ, C, BLOCK_DZ // Z_SPLIT)
    else:
        x_src, y_src, z_src = x_ptr, y_ptr, z_ptr
    n_chunks = (end - start + C - 1) // C
    # Scalar conditions enter masks as a row bound (DY or 0): Triton's interpreter rejects a
    # scalar boolean and-ed into a block mask.
    # the state entering the segment: the document's own part up to here (the boundary, computed
    # from zero) plus the state entering the document, decayed over the tokens before the segment
    from_bound = (came_from >= 0).to(tl.int32)
    at = h * sbh + dy[:, None] * sby + dz[None, :] * sbz
    if CHAIN:
        own = _local_state(y_ptr, z_ptr, y_src, z_src, start, end, tl.where(goes_to >= 0, n_chunks, 0), h, lam,
                           update_scale, syt, syh, szt, szh, rows, dy, dz, z0, ymask, zmask,
                           tl.zeros((BLOCK_DY, BLOCK_DZ // Z_SPLIT), dtype=tl.float32), C, REVERSE, DOT, PRECISION,
                           TMA)
        if came_from >= 0:
            while tl.atomic_add(flag_ptr + 1 + (came_from * H + h) * Z_SPLIT + zb, 0) == 0:
                pass
        state = tl.load(bound_ptr + tl.maximum(came_from, 0).to(tl.int64) * sbn + at,
                        mask=(dy < DY * from_bound)[:, None] & zmask[None, :], other=0.0, volatile=True)
        tl.store(bound_ptr + tl.maximum(goes_to, 0).to(tl.int64) * sbn + at,
                 state * tl.exp(lam * (end - start).to(tl.float32)) + own,
                 mask=(dy < DY * (goes_to >= 0).to(tl.int32))[:, None] & zmask[None, :])
        tl.debug_barrier()  # every thread's part stored before the flag says so
        if goes_to >= 0:
            tl.atomic_xchg(flag_ptr + 1 + (goes_to * H + h) * Z_SPLIT + zb, 1)
    else:
        state = tl.load(bound_ptr + tl.maximum(came_from, 0).to(tl.int64) * sbn + at,
                        mask=(dy < DY * from_bound)[:, None] & zmask[None, :], other=0.0).to(tl.float32)
    if HAS_EDGE_IN:
        before = _segment_offset(seg_ptr, seg, REVERSE).to(tl.float32)
        state += tl.exp(lam * before) * tl.load(
            edge_in_ptr + doc.to(tl.int64) * sen + h * seh + dy[:, None] * sey + dz[None, :] * sez,
            mask=ymask[:, None] & zmask[None, :], other=0.0).to(tl.float32)
    # decay inside a chunk depends only on the distance, non-negative on the visible side
    dist = rows[:, None] - rows[None, :]
    if REVERSE:
        dist = -dist
    intra_decay = tl.where(dist >= 0, tl.exp(lam * tl.maximum(dist, 0).to(tl.float32)), 0.0) * intra_scale

    for c in range(0, n_chunks):
        t0, L, valid, tok = _chunk_at(start, end, c, n_chunks, rows, C, REVERSE)
        x = _load_chunk(x_ptr, x_src, tok, t0 - start, h, sxt, sxh, dy, 0, valid, ymask, TMA).to(DOT)
        y = _load_chunk(y_ptr, y_src, tok, t0 - start, h, syt, syh, dy, 0, valid, ymask, TMA).to(DOT)
        z = _load_chunk(z_ptr, z_src, tok, t0 - start, h, szt, szh, dz, z0, valid, zmask, TMA).to(DOT)
        read, write = _chunk_weights(lam, rows, L, REVERSE)

        # At D = 128 the register file is the limit: the update's row weights go onto its z operand.
        scores = tl.dot(x, tl.trans(y), input_precision=PRECISION) * intra_decay
        out = tl.dot(scores.to(DOT), z, input_precision=PRECISION)
        # The read's row weights go onto the fp32 result, not onto x: x then never leaves shared memory (both
        # its dots take it from there), and the outputs leave by TMA where the loads came by it: at Z_SPLIT=2,
        # 4 warps (the tuner's pick at D=128), ptxas (triton 3.6, sm_90a) put 496 bytes a thread on the stack
        # before, 24 after.
        out += tl.dot(x, state.to(DOT), input_precision=PRECISION) * (read * read_scale)[:, None]
        if TMA:
            o_dst.store([t0 - start, h, z0], out.to(out_ptr.dtype.element_ty).reshape(C, 1, BLOCK_DZ // Z_SPLIT))
        else:
            tl.store(out_ptr + tok[:, None] * sot + h * soh + dz[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=valid[:, None] & zmask[None, :])

        z_write = z * (write * update_scale).to(DOT)[:, None]
        state = tl.dot(tl.trans(y), z_write, acc=state * tl.exp(lam * L.to(tl.float32)), input_precision=PRECISION)
    if STORE_EDGE_OUT:  # the document's last segment in the direction of travel
        last_one = ((goes_to < 0) & (end > start)).to(tl.int32)
        tl.store(edge_out_ptr + ((doc.to(tl.int64) * H + h) * DY + dy[:, None]) * DZ + dz[None, :], state,
                 mask=(dy < DY * last_one)[:, None] & zmask[None, :])


@autotune(configs=_configs([(1, 8, 2), (2, 8, 2), (2, 4, 3)]), key=["DY", "DZ", "TMA"],
          prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _segment_state(y_ptr, z_ptr, local_ptr, tail_ptr, seg_ptr, lam_ptr, syt, syh, szt, szh,
                   H, update_scale,
                   DY: tl.constexpr, DZ: tl.constexpr, BLOCK_DY: tl.constexpr, BLOCK_DZ: tl.constexpr,
                   C: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   TAILS: tl.constexpr, TMA: tl.constexpr, Z_SPLIT: tl.constexpr):
    # The same state recurrence as _segment_output, from a zero state, keeping only the end; it
    # is needed where a boundary follows in the direction of travel, and with TAILS also for a
    # document's last segment (its share of the document's own exit state, into tail[doc]).
    pid = tl.program_id(0)
    zb = pid % Z_SPLIT
    h = (pid // Z_SPLIT) % H
    seg = pid // (Z_SPLIT * H)
    start, end, doc, came_from, goes_to = _segment_info(seg_ptr, seg, REVERSE)
    lam = tl.load(lam_ptr + h).to(tl.float32)

    rows = tl.arange(0, C)
    dy = tl.arange(0, BLOCK_DY)
    dz = zb * (BLOCK_DZ // Z_SPLIT) + tl.arange(0, BLOCK_DZ // Z_SPLIT)
    ymask, zmask = dy < DY, dz < DZ
    if TAILS:
        n_chunks = (end - start + C - 1) // C
    else:
        n_chunks = tl.where(goes_to >= 0, (end - start + C - 1) // C, 0)
    z0 = zb * (BLOCK_DZ // Z_SPLIT)
    if TMA:
        y_src = _segment_desc(y_ptr, start, end, H, syt, syh, DY, C, BLOCK_DY)
        z_src = _segment_desc(z_ptr, start, end, H, szt, szh, DZ, C, BLOCK_DZ // Z_SPLIT)
    else:
        y_src, z_src = y_ptr, z_ptr
    state = _local_state(y_ptr, z_ptr, y_src, z_src, start, end, n_chunks, h, lam, update_scale, syt, syh, szt, szh,
                         rows, dy, dz, z0, ymask, zmask, tl.zeros((BLOCK_DY, BLOCK_DZ // Z_SPLIT), dtype=tl.float32),
                         C, REVERSE, DOT, PRECISION, TMA)
    offs = ((tl.maximum(goes_to, 0).to(tl.int64) * H + h) * DY + dy[:, None]) * DZ + dz[None, :]
    tl.store(local_ptr + offs, state, mask=(dy < DY * (goes_to >= 0).to(tl.int32))[:, None] & zmask[None, :])
    if TAILS:  # unused table entries (start == end) write nothing
        is_tail = ((goes_to < 0) & (end > start)).to(tl.int32)
        tail = ((doc.to(tl.int64) * H + h) * DY + dy[:, None]) * DZ + dz[None, :]
        tl.store(tail_ptr + tail, state, mask=(dy < DY * is_tail)[:, None] & zmask[None, :])


@Launch
@triton.jit
def _segment_scan(local_ptr, tail_ptr, bound_ptr, edge_in_ptr, edge_out_ptr, seg_ptr, doc_seg_ptr, lam_ptr,
                  sen, seh, sey, sez, H,
                  DY: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr, ROWS: tl.constexpr,
                  ROW_BLOCKS: tl.constexpr, REVERSE: tl.constexpr, HAS_EDGE_IN: tl.constexpr,
                  EDGE_OUT: tl.constexpr):
    # One program: one document, one head, ROWS rows of the state. The loop is sequential over
    # the document's boundaries only (a few hundred at most), plain fp32 loads and FMAs.
    # Boundaries hold the document's own part from a zero state; the output pass adds the state
    # entering the document (edge_in), decayed. EDGE_OUT: 0 writes no exit state, 1 writes empty
    # documents' (= edge_in; the output pass writes the others'), 2 writes every document's own
    # exit state, folding in its last segment's share from tail.
    pid = tl.program_id(0)
    rb = pid % ROW_BLOCKS
    h = (pid // ROW_BLOCKS) % H
    doc = pid // (ROW_BLOCKS * H)
    dy = rb * ROWS + tl.arange(0, ROWS)
    dz = tl.arange(0, BLOCK_DZ)
    mask = (dy < DY)[:, None] & (dz < DZ)[None, :]
    lam = tl.load(lam_ptr + h).to(tl.float32)
    first = tl.load(doc_seg_ptr + doc)
    last = tl.load(doc_seg_ptr + doc + 1)

    carry = tl.zeros((ROWS, BLOCK_DZ), dtype=tl.float32)
    inner = (h * DY + dy[:, None]) * DZ + dz[None, :]
    for i in range(0, last - first - 1):
        # the segment whose own contribution crosses the next boundary in the direction of travel
        if REVERSE:
            seg = last - 1 - i
        else:
            seg = first + i
        start, end, _, _, bound = _segment_info(seg_ptr, seg, REVERSE)
        offs = bound.to(tl.int64) * (H * DY * DZ) + inner
        carry = carry * tl.exp(lam * (end - start).to(tl.float32)) + tl.load(local_ptr + offs, mask=mask, other=0.0)
        tl.store(bound_ptr + offs, carry, mask=mask)
    if EDGE_OUT == 1:  # an empty document has no segment to write its final state: it is the initial one
        empty = (dy < DY * (last == first).to(tl.int32))[:, None] & (dz < DZ)[None, :]
        if HAS_EDGE_IN:
            carry = tl.load(edge_in_ptr + doc.to(tl.int64) * sen + h * seh + dy[:, None] * sey + dz[None, :] * sez,
                            mask=empty, other=0.0).to(tl.float32)
        tl.store(edge_out_ptr + doc.to(tl.int64) * (H * DY * DZ) + inner, carry, mask=empty)
    if EDGE_OUT == 2:
        has = (last > first).to(tl.int32)
        if REVERSE:
            seg = first
        else:
            seg = tl.maximum(last - 1, 0)
        start, end, _, _, _ = _segment_info(seg_ptr, seg, REVERSE)
        at = doc.to(tl.int64) * (H * DY * DZ) + inner
        span = tl.where(has > 0, end - start, 0).to(tl.float32)
        carry = carry * tl.exp(lam * span) + tl.load(tail_ptr + at, mask=(dy < DY * has)[:, None] & (dz < DZ)[None, :],
                                                     other=0.0)
        tl.store(edge_out_ptr + at, carry, mask=mask)


# ------------------------------------------------------------------------------------ host side

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def segment_length(tokens: int, heads: int, device: torch.device) -> int:
    """Tokens per segment: the longest (power of two times C, at most MAX_SEGMENT) that still gives
    each SM about one segment of some head (a grid of (tokens / seg_len) x heads x column blocks).
    "About": 7/8 of the SMs, so that 4 segments of 32 heads count as a full grid on 132 SMs. A row that
    fits in one segment skips the state pass (kernels 1-2), the rest of a long row pays it: on one H200
    (H=32, D=128, bf16, fwd+bwd; docs/benchmarks/2026-11-28-gpu-31st/call1) 4 rows of 16k ran 22.0 Mtok/s
    at 16384-token segments against 19.5 at 8192, one 64k row 18.3 against 17.8; 32768 and 65536 lost
    at 64k (64 or 32 segment-heads: 11.3, 7.8) and tied at 256k. Earlier: longer won over a fuller grid
    (one 16k row 12.8 Mtok/s at 2048 against 11.5 at 512, docs/benchmarks/2026-11-26-4gpu-7th/call1; with
    the TMA loads one 32k row 3.18 ms at 8192 against 3.56, one H100, 2026-11-27-gpu-19th/call3).
    Only the grid depends on it, never a compiled kernel or a tuning key."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    seg = MIN_SEGMENT
    while seg < MAX_SEGMENT and 8 * (tokens // (2 * seg)) * heads >= 7 * sms:
        seg *= 2
    return seg


_TABLES = WeakIdKeyDictionary()  # cu_seqlens tensor -> {(batch, seq_len, seg_len, device): (its version, table)}


def segment_table(cu_seqlens, batch: int, seq_len: int, seg_len: int, device):
    """`_segment_table`, built once per boundaries: every layer of a step passes the same tensor
    (or none), and a table is some 25 small launches."""
    key = (batch, seq_len, seg_len, torch.device(device))
    if cu_seqlens is None:
        return _dense_table(*key)
    if cu_seqlens.is_inference():  # (inference tensors have no version)
        return _segment_table(cu_seqlens, *key)
    known = _TABLES.setdefault(cu_seqlens, {})
    if key not in known or known[key][0] != cu_seqlens._version:
        known[key] = (cu_seqlens._version, _segment_table(cu_seqlens, *key))
    return known[key][1]


@functools.lru_cache(maxsize=16)
def _dense_table(batch, seq_len, seg_len, device):
    return _segment_table(None, batch, seq_len, seg_len, device)


def _segment_table(cu_seqlens, batch: int, seq_len: int, seg_len: int, device):
    """Segments of the flattened [B * S] token axis, built on the device without a host sync.

    Returns (segments int32 [n_max, SEG_COLS], doc_segments int32 [N + 1] (each document's range
    of segments), N, n_max, n_bounds). n_max = T // seg_len + N bounds the number of segments
    (each document wastes less than one); the unused tail entries are empty (start == end) with
    no boundaries. Boundaries (two segments of one document meet) are numbered in token order;
    there are at most n_bounds = T // seg_len of them, however many documents there are.
    """
    if cu_seqlens is None:
        cu = torch.arange(0, batch + 1, device=device, dtype=torch.int64) * seq_len
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
    n_docs = cu.numel() - 1
    per_doc = (cu[1:] - cu[:-1] + seg_len - 1) // seg_len
    doc_seg = torch.zeros(n_docs + 1, device=device, dtype=torch.int64)
    doc_seg[1:] = torch.cumsum(per_doc, 0)
    n_max = batch * seq_len // seg_len + n_docs
    g = torch.arange(n_max, device=device, dtype=torch.int64)
    doc = torch.searchsorted(doc_seg[1:].contiguous(), g, right=True)
    used = doc < n_docs
    doc = doc.clamp(max=n_docs - 1)
    index = g - doc_seg[doc]  # the segment's place in its document
    start = cu[doc] + index * seg_len
    end = torch.minimum(start + seg_len, cu[doc + 1])
    has_before = used & (index > 0)
    has_after = used & (index < per_doc[doc] - 1)
    # segment s's boundary after has the same number as segment s+1's boundary before: both
    # count, in order, the pairs of neighbouring segments of one document
    before = torch.where(has_before, torch.cumsum(has_before, 0) - 1, -1)
    after = torch.where(has_after, torch.cumsum(has_after, 0) - 1, -1)
    segs = torch.stack([torch.where(used, start, 0), torch.where(used, end, 0), doc, before, after,
                        torch.where(used, start - cu[doc], 0), torch.where(used, cu[doc + 1] - end, 0)], dim=1)
    return (segs.to(torch.int32).contiguous(), doc_seg.to(torch.int32), n_docs, n_max,
            max(1, batch * seq_len // seg_len))


def _dot_types(dtype):
    # Triton's CPU interpreter mis-multiplies bf16 (it holds bf16 as uint16 for numpy), so the
    # interpreted kernels keep fp32 operands; loads and stores still run in the inputs' dtype.
    if dtype == torch.float32 or _interpreting():
        return tl.float32, "ieee"
    return tl.bfloat16, "tf32"  # the precision flag only matters for fp32 operands


def _tokens(t):
    """[B, S, H, D] -> [B * S, H, D] with unit stride on D (a view whenever possible)."""
    B, S, H, D = t.shape
    t = t.reshape(B * S, H, D)
    return t if t.stride(-1) == 1 else t.contiguous()


def _dims(dy, dz):
    return dict(DY=dy, DZ=dz, BLOCK_DY=max(16, triton.next_power_of_2(dy)),
                BLOCK_DZ=max(16, triton.next_power_of_2(dz)))


def chained() -> bool:
    """Whether a plain call (no `exchange`) makes its boundary states inside the output pass
    (`_chained`; SEQPAR_LIGHTNING_CHAIN=1, opt-in: slower, module docstring)."""
    return os.environ.get(CHAIN_ENV, "0").strip() not in ("0", "")


@functools.lru_cache(maxsize=None)
def _no_flags(device) -> torch.Tensor:
    return torch.zeros(1, device=device, dtype=torch.int32)  # an unchained launch's flag argument


def _output(x, y, z, bound, bound_strides, edge_in, edge_in_strides, edge_out, tab, lam, scales, reverse,
            out_dtype, flags=None):
    """One `_segment_output` launch: x, y `[T, H, Dy]`, z `[T, H, Dz]`, returns `[T, H, Dz]`.
    Writes `edge_out` ([N, H, Dy, Dz] fp32, the state past each document) when it is given.
    `flags` (zeros, `_chained`): the launch also writes `bound`, from y and z."""
    segs, _, _, n_max, _ = tab
    T, H, dy = x.shape
    dz = z.shape[-1]
    out = torch.empty(T, H, dz, device=x.device, dtype=out_dtype)
    dot, prec = _dot_types(x.dtype)
    _segment_output[lambda meta: (n_max * H * meta["Z_SPLIT"],)](
        x, y, z, out, bound, edge_in if edge_in is not None else bound,
        edge_out if edge_out is not None else bound, segs, lam, flags if flags is not None else _no_flags(x.device),
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        *bound_strides, *(edge_in_strides if edge_in is not None else (0, 0, 0, 0)), H, n_max, *scales,
        C=CHUNK, REVERSE=reverse, DOT=dot, PRECISION=prec, HAS_EDGE_IN=edge_in is not None,
        STORE_EDGE_OUT=edge_out is not None, TMA=use_tma(x, y, z, out, default_on=TMA_DEFAULT),
        CHAIN=flags is not None, **_dims(dy, dz))
    return out


def _chained(x, y, z, edge_in, edge_out, tab, lam, scales, reverse, out_dtype):
    """Kernels 1-3 as one launch (`_segment_output` with CHAIN): returns (outputs, the boundary
    states `[n_bounds, H, Dy, Dz]` that kernels 1-2 would have made). A segment's pass over its
    y, z for its own contribution then runs beside other segments' output passes, not in a launch
    of its own before them all: the memory-bound state work under the output work."""
    _, doc_seg, _, _, n_bounds = tab
    H, dy, dz = x.shape[1], y.shape[2], z.shape[2]
    bound = torch.empty(n_bounds, H, dy, dz, device=x.device, dtype=torch.float32)
    flags = torch.zeros(1 + n_bounds * H * MAX_Z_SPLIT, device=x.device, dtype=torch.int32)
    out = _output(x, y, z, bound, bound.stride(), edge_in, None if edge_in is None else edge_in.stride(), edge_out,
                  tab, lam, scales, reverse, out_dtype, flags)
    if edge_out is not None:  # an empty document has no segment to write its exit state: it is the entering one
        empty = (doc_seg[1:] == doc_seg[:-1]).view(-1, 1, 1, 1)
        edge_out.copy_(torch.where(empty, 0.0 if edge_in is None else edge_in.to(edge_out.dtype), edge_out))
    return out, bound


def _segment_locals(y, z, tab, lam, update_scale, reverse, tails=None):
    """Kernel 1: each segment's own state `[n_bounds, H, Dy, Dz]` (fp32), indexed by the boundary
    it crosses in the direction of travel; with `tails` ([N, H, Dy, Dz]) also the share of each
    document's last segment in that direction, which crosses no boundary."""
    segs, _, _, n_max, n_bounds = tab
    T, H, dy = y.shape
    dz = z.shape[-1]
    dot, prec = _dot_types(y.dtype)
    local = torch.empty(n_bounds, H, dy, dz, device=y.device, dtype=torch.float32)
    _segment_state[lambda meta: (n_max * H * meta["Z_SPLIT"],)](
        y, z, local, tails if tails is not None else local, segs, lam, y.stride(0), y.stride(1), z.stride(0),
        z.stride(1), H, update_scale, C=CHUNK, REVERSE=reverse, DOT=dot, PRECISION=prec, TAILS=tails is not None,
        TMA=use_tma(y, z, default_on=TMA_DEFAULT), **_dims(dy, dz))
    return local


def _scan(local, tab, lam, reverse, edge_in=None, edge_out=None, tails=None):
    """Kernel 2: each document's own state at each of its boundaries (in the direction of travel,
    from a zero state; the output pass adds the entering state). `edge_out` gets every document's
    own exit state when `tails` is given, else empty documents' exit state, `edge_in` (or zeros)."""
    segs, doc_seg, n_docs, _, _ = tab
    _, H, dy, dz = local.shape
    block_dz = _dims(dy, dz)["BLOCK_DZ"]
    bound = torch.empty_like(local)
    rows = min(SCAN_ROWS, max(16, triton.next_power_of_2(dy)))
    row_blocks = triton.cdiv(dy, rows)
    _segment_scan[(n_docs * H * row_blocks,)](
        local, tails if tails is not None else local, bound, edge_in if edge_in is not None else local,
        edge_out if edge_out is not None else local, segs, doc_seg, lam,
        *(edge_in.stride() if edge_in is not None else (0, 0, 0, 0)), H,
        DY=dy, DZ=dz, BLOCK_DZ=block_dz, ROWS=rows, ROW_BLOCKS=row_blocks, REVERSE=reverse,
        HAS_EDGE_IN=edge_in is not None, EDGE_OUT=0 if edge_out is None else (2 if tails is not None else 1),
        num_warps=4)
    return bound


def _exchange_start(y, z, tab, lam, update_scale, reverse, exchange_fn):
    """Kernels 1 and 2 with each document's own exit state, handed to `exchange_fn`; returns
    (boundary states, the exchange's pending answer: `.wait()` gives the entering states)."""
    H, dy, dz = y.shape[1], y.shape[2], z.shape[2]
    tails = torch.empty(tab[2], H, dy, dz, device=y.device, dtype=torch.float32)
    local = _segment_locals(y, z, tab, lam, update_scale, reverse, tails)
    own = torch.empty_like(tails)
    bound = _scan(local, tab, lam, reverse, edge_out=own, tails=tails)
    return bound, exchange_fn(own)


def _exchange_wait(pending, shape):
    """The entering states, or None where the exchange has none for this rank (every document then
    starts from zero)."""
    entering = pending.wait()
    if entering is None:
        return None
    if tuple(entering.shape) != shape:
        raise ValueError(f"lightning_attn exchange returned states of shape {tuple(entering.shape)}, expected {shape}")
    return entering.to(torch.float32).contiguous()


def _boundary_states(y, z, tab, lam, update_scale, reverse, edge_in=None, edge_out=None):
    """Kernels 1 and 2: each document's own state at its boundaries `[n_bounds, H, Dy, Dz]` (fp32)
    in the direction of travel; `edge_out` gets empty documents' exit state (`edge_in`)."""
    local = _segment_locals(y, z, tab, lam, update_scale, reverse)
    return _scan(local, tab, lam, reverse, edge_in, edge_out)


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, seg_len, exchange):
        B, S, H, Dk = q.shape
        Dv = v.shape[-1]
        tab = segment_table(cu_seqlens, B, S, seg_len, q.device)
        lam = log_decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
        qt, kt, vt = _tokens(q), _tokens(k), _tokens(v)
        final = None
        if exchange is not None:
            bound, pending = _exchange_start(kt, vt, tab, lam, 1.0, False, exchange.forward)
            init = _exchange_wait(pending, (tab[2], H, Dk, Dv))
        else:
            init = None if initial_state is None else initial_state.detach()
            if output_final_state:
                final = torch.empty(tab[2], H, Dk, Dv, device=q.device, dtype=torch.float32)
        if exchange is None and chained():
            o, bound = _chained(qt, kt, vt, init, final, tab, lam, (scale, scale, 1.0), False, q.dtype)
        else:
            if exchange is None:
                bound = _boundary_states(kt, vt, tab, lam, 1.0, False, init, final)
            o = _output(qt, kt, vt, bound, bound.stride(), init, None if init is None else init.stride(), final,
                        tab, lam, (scale, scale, 1.0), False, q.dtype)
        ctx.save_for_backward(qt, kt, vt, lam, bound, init, tab[0], tab[1])
        ctx.meta = (q.shape, Dv, scale, tab[2], tab[3], tab[4], None if initial_state is None else initial_state.dtype)
        ctx.exchange = exchange
        return o.view(B, S, H, Dv), final

    @staticmethod
    def backward(ctx, do, dfinal):
        qt, kt, vt, lam, bound, init, segs, doc_seg = ctx.saved_tensors
        shape, Dv, scale, n_docs, n_max, n_bounds, init_dtype = ctx.meta
        tab = (segs, doc_seg, n_docs, n_max, n_bounds)
        B, S, H, Dk = shape
        if do is None:  # only the final state was used
            do = torch.zeros(B, S, H, Dv, device=qt.device, dtype=qt.dtype)
        go = _tokens(do.to(qt.dtype))
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        need_init = ctx.needs_input_grad[5]
        dq = dk = dv = dinit = pending = None
        if ctx.exchange is not None:
            # every rank of the exchange's group takes part, whatever it needs gradients for: it
            # gets each document's d(entering state) and answers dFinal, while the dq pass runs
            grad_bound, pending = _exchange_start(qt, go, tab, lam, scale, True, ctx.exchange.backward)
        if need_q:
            dq = _output(go, vt, kt, bound, _strides(bound, transpose=True), init,
                         None if init is None else _strides(init, transpose=True), None,
                         tab, lam, (scale, scale, 1.0), False, qt.dtype).view(shape)
        if pending is not None:
            dfinal = _exchange_wait(pending, (n_docs, H, Dk, Dv))
        elif need_init:
            dinit = torch.empty(n_docs, H, Dk, Dv, device=qt.device, dtype=torch.float32)
        # E: the gradient flowing into each segment from the tokens after it, and from dFinal;
        # the dv pass also writes d initial_state
        if pending is None and (need_v or need_init) and chained():
            dv, grad_bound = _chained(kt, qt, go, dfinal, dinit, tab, lam, (scale, 1.0, scale), True, qt.dtype)
            dv = dv.view(B, S, H, Dv)
        else:
            if pending is None and (need_k or need_v or need_init):
                grad_bound = _boundary_states(qt, go, tab, lam, scale, True, dfinal, dinit)
            if need_v or need_init:
                dv = _output(kt, qt, go, grad_bound, grad_bound.stride(), dfinal,
                             None if dfinal is None else dfinal.stride(), dinit, tab, lam, (scale, 1.0, scale), True,
                             qt.dtype).view(B, S, H, Dv)
        if need_k:
            dk = _output(vt, go, qt, grad_bound, _strides(grad_bound, transpose=True), dfinal,
                         None if dfinal is None else _strides(dfinal, transpose=True), None, tab, lam,
                         (scale, 1.0, scale), True, qt.dtype).view(shape)
        if dinit is not None:
            dinit = dinit.to(init_dtype)
        return dq, dk, dv if need_v else None, None, None, dinit, None, None, None, None


def _strides(state, transpose=False):
    s = state.stride()
    return (s[0], s[1], s[3], s[2]) if transpose else s


def lightning_attn_triton(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None, exchange=None, seg_len=None):
    """`seqpar.kernels.lightning_attn` on Triton; same contract as the reference.

    `cu_seqlens` is trusted (no host sync to check it); the reference checks it on CPU runs.
    `seg_len` (a multiple of 64) overrides the segment length; tests use it to cross segments.
    `exchange`: see `seqpar.kernels.lightning_attn`.
    """
    B, S, H, Dk = q.shape
    Dv = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or tuple(log_decay.shape) != (H,):
        raise ValueError(f"lightning_attn shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"log_decay {tuple(log_decay.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed documents need batch size 1, got q of shape {tuple(q.shape)}")
    n_docs = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and tuple(initial_state.shape) != (n_docs, H, Dk, Dv):
        raise ValueError(f"initial_state must be {(n_docs, H, Dk, Dv)}, got {tuple(initial_state.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.float16:
        # The kernels' dots take bf16 operands for fp16 inputs too, and Triton 3.6 miscompiles that
        # conversion of the loaded tiles at Dk = 64 on sm_90 (compute-sanitizer, H100, 2026-11-27:
        # out-of-range shared address at the tile loads of `_segment_output`): round the inputs to
        # bf16 here instead, the same dot operands, one rounding of the output more.
        o, final = lightning_attn_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay, scale=scale,
                                         initial_state=initial_state, output_final_state=output_final_state,
                                         cu_seqlens=cu_seqlens, exchange=exchange, seg_len=seg_len)
        return o.to(torch.float16), final
    scale = Dk ** -0.5 if scale is None else float(scale)
    if seg_len is None:
        seg_len = segment_length(B * S, H, q.device)
    if seg_len % CHUNK:
        raise ValueError(f"seg_len={seg_len} must be a multiple of {CHUNK}")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
    return LightningAttnFunction.apply(q, k, v, log_decay, scale, initial_state, output_final_state,
                                       cu_seqlens, seg_len, exchange)
