"""Lightning attention in Triton: chunked decayed linear attention (Lightning Attention-2 tiling),
forward and backward, packed documents through `cu_seqlens`, initial and final states.

Two levels of blocking. Chunks of C = 64 tokens run inside one program: a masked decayed
quadratic form within the chunk plus a read of the running state, then the state update
(Qin et al., Lightning Attention-2, 2024). Segments of `seg_len` tokens (a multiple of C; a
segment never crosses a document start) are the unit of parallelism. Three kernels:

  1. `_segment_state`: each segment's own contribution to the state at its end, from zero
     (parallel over segment x head x column block);
  2. `_segment_scan`: per document, the state entering each segment, a short fp32 scan over
     that document's segments, starting from the initial state; it also yields the final state;
  3. `_segment_output`: per segment, walks its chunks from the entering state and writes the
     outputs (parallel like 1).

Only one state per segment is ever materialised (not one per chunk, as fla's chunk kernels do),
so state traffic stays small next to q/k/v, and the parallelism is (tokens / seg_len) x heads
whatever the batch and document layout: throughput per token does not depend on S.

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
and d(initial_state) = E before a document's first token, what the backward scan ends with.
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
import triton.language as tl

CHUNK = 64
# Segments: long enough that the per-segment states (fp32, Dk x Dv per head) cost little memory
# traffic next to q/k/v (2*Dv/seg_len of q's bytes), short enough for >= 4 programs per SM.
MIN_SEGMENT, MAX_SEGMENT = 256, 2048
SCAN_ROWS = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(split_options):
    # Few configs, tuned once per (Dy, Dz, dtypes): the key holds no length, no token count and no
    # document count, so packed batches of changing lengths never trigger a re-tune.
    configs = [triton.Config({"Z_SPLIT": z}, num_warps=w, num_stages=s) for z, w, s in split_options]
    return configs[:1] if _interpreting() else configs


def _prune(configs, named_args, **_):
    # A column block narrower than 16 cannot feed tl.dot.
    kept = [c for c in configs if named_args["BLOCK_DZ"] // c.kwargs["Z_SPLIT"] >= 16]
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


@triton.autotune(configs=_configs([(1, 8, 2), (2, 8, 2), (2, 4, 2)]), key=["DY", "DZ"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _segment_output(x_ptr, y_ptr, z_ptr, out_ptr, state_ptr, seg_ptr, lam_ptr,
                    sxt, sxh, syt, syh, szt, szh, sot, soh, ssn, ssh, ssy, ssz,
                    H, intra_scale, read_scale, update_scale,
                    DY: tl.constexpr, DZ: tl.constexpr, BLOCK_DY: tl.constexpr, BLOCK_DZ: tl.constexpr,
                    C: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                    Z_SPLIT: tl.constexpr):
    # One program: one segment, one head, one block of z's columns. Neighbouring programs share
    # the segment (and its x, y tiles through L2) and differ in column block, then head.
    pid = tl.program_id(0)
    zb = pid % Z_SPLIT
    h = (pid // Z_SPLIT) % H
    seg = pid // (Z_SPLIT * H)
    start = tl.load(seg_ptr + 2 * seg)
    end = tl.load(seg_ptr + 2 * seg + 1)
    lam = tl.load(lam_ptr + h).to(tl.float32)

    rows = tl.arange(0, C)
    dy = tl.arange(0, BLOCK_DY)
    dz = zb * (BLOCK_DZ // Z_SPLIT) + tl.arange(0, BLOCK_DZ // Z_SPLIT)
    ymask, zmask = dy < DY, dz < DZ
    state = tl.load(state_ptr + seg.to(tl.int64) * ssn + h * ssh + dy[:, None] * ssy + dz[None, :] * ssz,
                    mask=ymask[:, None] & zmask[None, :], other=0.0).to(tl.float32)
    # decay inside a chunk depends only on the distance, non-negative on the visible side
    dist = rows[:, None] - rows[None, :]
    if REVERSE:
        dist = -dist
    intra_decay = tl.where(dist >= 0, tl.exp(lam * tl.maximum(dist, 0).to(tl.float32)), 0.0) * intra_scale

    n_chunks = tl.cdiv(end - start, C)
    for c in range(0, n_chunks):
        if REVERSE:
            t0 = start + (n_chunks - 1 - c) * C
        else:
            t0 = start + c * C
        L = tl.minimum(end - t0, C)
        valid = rows < L
        tok = (t0 + rows).to(tl.int64)
        x = tl.load(x_ptr + tok[:, None] * sxt + h * sxh + dy[None, :],
                    mask=valid[:, None] & ymask[None, :], other=0.0).to(DOT)
        y = tl.load(y_ptr + tok[:, None] * syt + h * syh + dy[None, :],
                    mask=valid[:, None] & ymask[None, :], other=0.0).to(DOT)
        z = tl.load(z_ptr + tok[:, None] * szt + h * szh + dz[None, :],
                    mask=valid[:, None] & zmask[None, :], other=0.0).to(DOT)
        read, write = _chunk_weights(lam, rows, L, REVERSE)

        # Row weights go onto the dot operands (in their dtype) rather than onto fp32 results, so
        # that one fp32 accumulator is live besides the state: at D = 128 the register file is the
        # limit (checked with ptxas for sm_90a: no spills at 8 warps).
        scores = tl.dot(x, tl.trans(y), input_precision=PRECISION) * intra_decay
        out = tl.dot(scores.to(DOT), z, input_precision=PRECISION)
        x_read = x * (read * read_scale).to(DOT)[:, None]
        out = tl.dot(x_read, state.to(DOT), acc=out, input_precision=PRECISION)
        tl.store(out_ptr + tok[:, None] * sot + h * soh + dz[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & zmask[None, :])

        z_write = z * (write * update_scale).to(DOT)[:, None]
        state = tl.dot(tl.trans(y), z_write, acc=state * tl.exp(lam * L.to(tl.float32)), input_precision=PRECISION)


@triton.autotune(configs=_configs([(1, 8, 2), (2, 8, 2), (2, 4, 3)]), key=["DY", "DZ"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _segment_state(y_ptr, z_ptr, local_ptr, seg_ptr, lam_ptr, syt, syh, szt, szh,
                   H, update_scale,
                   DY: tl.constexpr, DZ: tl.constexpr, BLOCK_DY: tl.constexpr, BLOCK_DZ: tl.constexpr,
                   C: tl.constexpr, REVERSE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                   Z_SPLIT: tl.constexpr):
    # The same state recurrence as _segment_output, from a zero state, keeping only the end.
    pid = tl.program_id(0)
    zb = pid % Z_SPLIT
    h = (pid // Z_SPLIT) % H
    seg = pid // (Z_SPLIT * H)
    start = tl.load(seg_ptr + 2 * seg)
    end = tl.load(seg_ptr + 2 * seg + 1)
    lam = tl.load(lam_ptr + h).to(tl.float32)

    rows = tl.arange(0, C)
    dy = tl.arange(0, BLOCK_DY)
    dz = zb * (BLOCK_DZ // Z_SPLIT) + tl.arange(0, BLOCK_DZ // Z_SPLIT)
    ymask, zmask = dy < DY, dz < DZ
    state = tl.zeros((BLOCK_DY, BLOCK_DZ // Z_SPLIT), dtype=tl.float32)
    n_chunks = tl.cdiv(end - start, C)
    for c in range(0, n_chunks):
        if REVERSE:
            t0 = start + (n_chunks - 1 - c) * C
        else:
            t0 = start + c * C
        L = tl.minimum(end - t0, C)
        valid = rows < L
        tok = (t0 + rows).to(tl.int64)
        y = tl.load(y_ptr + tok[:, None] * syt + h * syh + dy[None, :],
                    mask=valid[:, None] & ymask[None, :], other=0.0).to(DOT)
        z = tl.load(z_ptr + tok[:, None] * szt + h * szh + dz[None, :],
                    mask=valid[:, None] & zmask[None, :], other=0.0).to(DOT)
        _, write = _chunk_weights(lam, rows, L, REVERSE)
        z_write = z * (write * update_scale).to(DOT)[:, None]
        state = tl.dot(tl.trans(y), z_write, acc=state * tl.exp(lam * L.to(tl.float32)), input_precision=PRECISION)
    offs = ((seg.to(tl.int64) * H + h) * DY + dy[:, None]) * DZ + dz[None, :]
    tl.store(local_ptr + offs, state, mask=ymask[:, None] & zmask[None, :])


@triton.jit
def _segment_scan(local_ptr, state_ptr, init_ptr, final_ptr, seg_ptr, doc_seg_ptr, lam_ptr,
                  sin, sih, siy, siz, H,
                  DY: tl.constexpr, DZ: tl.constexpr, BLOCK_DZ: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr):
    # One program: one document, one head, ROWS rows of the state. The loop is sequential over
    # the document's segments only (a few hundred at most), plain fp32 loads and FMAs.
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

    if HAS_INIT:
        carry = tl.load(init_ptr + doc.to(tl.int64) * sin + h * sih + dy[:, None] * siy + dz[None, :] * siz,
                        mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((ROWS, BLOCK_DZ), dtype=tl.float32)
    inner = (h * DY + dy[:, None]) * DZ + dz[None, :]
    for i in range(0, last - first):
        if REVERSE:
            seg = last - 1 - i
        else:
            seg = first + i
        n = tl.load(seg_ptr + 2 * seg + 1) - tl.load(seg_ptr + 2 * seg)
        offs = seg.to(tl.int64) * (H * DY * DZ) + inner
        local = tl.load(local_ptr + offs, mask=mask, other=0.0)
        tl.store(state_ptr + offs, carry, mask=mask)
        carry = carry * tl.exp(lam * n.to(tl.float32)) + local
    if STORE_FINAL:
        tl.store(final_ptr + doc.to(tl.int64) * (H * DY * DZ) + inner, carry, mask=mask)


# ------------------------------------------------------------------------------------ host side

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def segment_length(tokens: int, heads: int, device: torch.device) -> int:
    """Tokens per segment: the longest (power of two times C) that still gives about 4 programs
    per SM. Only the grid depends on it, never a compiled kernel or a tuning key."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    seg = MIN_SEGMENT
    while seg < MAX_SEGMENT and (tokens // (2 * seg)) * heads >= 4 * sms:
        seg *= 2
    return seg


def segment_table(cu_seqlens, batch: int, seq_len: int, seg_len: int, device):
    """Segments of the flattened [B * S] token axis, built on the device without a host sync.

    Returns (segments int32 [n_max, 2] of (start, end), doc_segments int32 [N + 1] (the segment
    range of each document), N, n_max). n_max = T // seg_len + N bounds the true count (each
    document wastes less than one segment); the unused tail entries are empty (start == end).
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
    start = cu[doc] + (g - doc_seg[doc]) * seg_len
    end = torch.minimum(start + seg_len, cu[doc + 1])
    segs = torch.stack([torch.where(used, start, 0), torch.where(used, end, 0)], dim=1)
    return segs.to(torch.int32).contiguous(), doc_seg.to(torch.int32), n_docs, n_max


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


def _output(x, y, z, state_strides, state, tab, lam, scales, reverse, out_dtype):
    """One `_segment_output` launch: x, y `[T, H, Dy]`, z `[T, H, Dz]`, returns `[T, H, Dz]`."""
    segs, _, _, n_max = tab
    T, H, dy = x.shape
    dz = z.shape[-1]
    out = torch.empty(T, H, dz, device=x.device, dtype=out_dtype)
    dot, prec = _dot_types(x.dtype)
    _segment_output[lambda meta: (n_max * H * meta["Z_SPLIT"],)](
        x, y, z, out, state, segs, lam,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        *state_strides, H, *scales, C=CHUNK, REVERSE=reverse, DOT=dot, PRECISION=prec, **_dims(dy, dz))
    return out


def _states(y, z, tab, lam, update_scale, reverse, init, store_final):
    """Kernels 1 and 2: the state entering each segment `[n_max, H, Dy, Dz]` (fp32) in the
    direction of travel, and the state after each document (`[N, H, Dy, Dz]`) if asked."""
    segs, doc_seg, n_docs, n_max = tab
    T, H, dy = y.shape
    dz = z.shape[-1]
    dot, prec = _dot_types(y.dtype)
    dims = _dims(dy, dz)
    local = torch.empty(n_max, H, dy, dz, device=y.device, dtype=torch.float32)
    _segment_state[lambda meta: (n_max * H * meta["Z_SPLIT"],)](
        y, z, local, segs, lam, y.stride(0), y.stride(1), z.stride(0), z.stride(1), H, update_scale,
        C=CHUNK, REVERSE=reverse, DOT=dot, PRECISION=prec, **dims)
    entering = torch.empty_like(local)
    final = torch.empty(n_docs, H, dy, dz, device=y.device, dtype=torch.float32) if store_final else local
    rows = min(SCAN_ROWS, dims["BLOCK_DY"])
    init_arg = init if init is not None else local
    init_strides = init.stride() if init is not None else (0, 0, 0, 0)
    row_blocks = triton.cdiv(dy, rows)
    _segment_scan[(n_docs * H * row_blocks,)](
        local, entering, init_arg, final, segs, doc_seg, lam, *init_strides, H,
        DY=dy, DZ=dz, BLOCK_DZ=dims["BLOCK_DZ"], ROWS=rows, ROW_BLOCKS=row_blocks, REVERSE=reverse,
        HAS_INIT=init is not None, STORE_FINAL=store_final, num_warps=4)
    return entering, (final if store_final else None)


class LightningAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, scale, initial_state, output_final_state, cu_seqlens, seg_len):
        B, S, H, Dk = q.shape
        tab = segment_table(cu_seqlens, B, S, seg_len, q.device)
        lam = log_decay.detach().to(device=q.device, dtype=torch.float32).contiguous()
        qt, kt, vt = _tokens(q), _tokens(k), _tokens(v)
        init = None if initial_state is None else initial_state.detach()
        entering, final = _states(kt, vt, tab, lam, 1.0, False, init, output_final_state)
        o = _output(qt, kt, vt, _strides(entering), entering, tab, lam, (scale, scale, 1.0), False, q.dtype)
        ctx.save_for_backward(qt, kt, vt, lam, entering, tab[0], tab[1])
        ctx.meta = (q.shape, v.shape[-1], scale, tab[2], tab[3],
                    None if initial_state is None else initial_state.dtype)
        return o.view(B, S, H, -1), final

    @staticmethod
    def backward(ctx, do, dfinal):
        qt, kt, vt, lam, entering, segs, doc_seg = ctx.saved_tensors
        shape, dv_dim, scale, n_docs, n_max, init_dtype = ctx.meta
        tab = (segs, doc_seg, n_docs, n_max)
        B, S, H, Dk = shape
        if do is None:  # only the final state was used
            do = torch.zeros(B, S, H, dv_dim, device=qt.device, dtype=qt.dtype)
        go = _tokens(do.to(qt.dtype))
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        need_init = ctx.needs_input_grad[5]
        dq = dk = dv = dinit = None
        if need_q:
            dq = _output(go, vt, kt, _strides(entering, transpose=True), entering, tab, lam,
                         (scale, scale, 1.0), False, qt.dtype).view(shape)
        if need_k or need_v or need_init:
            # E, the gradient flowing into each segment from the tokens after it (and dFinal)
            grad_in, dinit = _states(qt, go, tab, lam, scale, True, dfinal, need_init)
            if need_v:
                dv = _output(kt, qt, go, _strides(grad_in), grad_in, tab, lam, (scale, 1.0, scale), True,
                             qt.dtype).view(B, S, H, dv_dim)
            if need_k:
                dk = _output(vt, go, qt, _strides(grad_in, transpose=True), grad_in, tab, lam,
                             (scale, 1.0, scale), True, qt.dtype).view(shape)
            if dinit is not None:
                dinit = dinit.to(init_dtype)
        return dq, dk, dv, None, None, dinit, None, None, None


def _strides(state, transpose=False):
    s = state.stride()
    return (s[0], s[1], s[3], s[2]) if transpose else s


def lightning_attn_triton(q, k, v, log_decay, *, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None, seg_len=None):
    """`seqpar.kernels.lightning_attn` on Triton; same contract as the reference.

    `cu_seqlens` is trusted (no host sync to check it); the reference checks it on CPU runs.
    `seg_len` (a multiple of 64) overrides the segment length; tests use it to cross segments.
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
    scale = Dk ** -0.5 if scale is None else float(scale)
    if seg_len is None:
        seg_len = segment_length(B * S, H, q.device)
    if seg_len % CHUNK:
        raise ValueError(f"seg_len={seg_len} must be a multiple of {CHUNK}")
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(q.device)
    return LightningAttnFunction.apply(q, k, v, log_decay, scale, initial_state, output_final_state,
                                       cu_seqlens, seg_len)
