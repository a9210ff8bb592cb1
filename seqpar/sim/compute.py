"""Time of the GPU work of one rank: matmuls, softmax and linear attention kernels, element-wise passes.

- Matmuls run at the cluster's measured matmul efficiency of the bf16 peak.
- A softmax attention kernel call (forward + backward, FlashAttention/cuDNN form) on `nq` queries
  and `nk` keys costs `per_call + flops / rate + per_token * (nq + nk)`: `rate` is the kernel's
  throughput on big tiles; `per_token` is the traffic and bookkeeping that scale with the rows
  (loading Q/K/V/O/dO, the fp32 merges of ring steps); `per_call` the launches. Causal calls
  compute whole tiles on the diagonal, `nq * TILE / 2` pairs beyond the causal count. The three
  constants are fitted per kernel family (cudnn, flash) on the measured kernel and ring rows.
- Linear (lightning) attention runs at the measured tokens/s of its kernel, scaled by H * Dk * Dv.
- Element-wise kernels (norms, RoPE, SwiGLU, residual adds, casts, the loss) move their bytes at
  HBM bandwidth; `elementwise_factor` (fitted on the end-to-end run) covers the eager mode's
  unfused copies.

FLOP conventions follow seqpar.model.flops (and ANCHORS.md): causal attention forward counts
`4 * H * D * pairs`, the backward 2.5 times the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

TILE = 128
ATTN_FWD_BWD = 3.5  # backward = 2.5 x forward (ANCHORS.md's convention for attention kernels)
REF_HD = 32 * 128  # heads x head_dim of every measured attention row: per_token is per such row
# FlashAttention-2's paper (Dao 2023, fig. 5-6) measures head_dim 64 at ~0.85x the fwd+bwd TFLOP/s
# of head_dim 128 on A100; not measured here (every benchmark row is D=128): an assumption.
HEAD_DIM_RATE = {64: 0.85, 128: 1.0, 256: 0.95}


@dataclass(frozen=True)
class AttnFit:
    rate: float  # FLOP/s on big tiles
    per_token: float  # s per (query + key) row of REF_HD
    per_call: float  # s per kernel call

    def as_dict(self) -> dict:
        return {"rate_tflops": round(self.rate / 1e12, 1), "per_token_ns": round(self.per_token * 1e9, 3),
                "per_call_us": round(self.per_call * 1e6, 2)}


@dataclass(frozen=True)
class AttnCall:
    """One kernel call over `segments`: (queries, keys) pairs of independent pieces (a dense call
    has one; a varlen call one per document or task). Causal pieces are bottom-right aligned: the
    last query sees the last key."""
    segments: tuple[tuple[int, int], ...]
    causal: bool
    # called with document bounds (a ring block with cu_seqlens, a disagg server's call): never the
    # family's dense kernel; one document is torch's varlen flash before c8d5eb5 (kernels/dispatch.py
    # _lse_backend) and Triton since (_wants_triton): attention_cost.attn_seconds picks by era
    with_bounds: bool = False
    # self-attention over a packed row without lse (the model's own call where cp = 1, Ulysses' after its
    # all-to-all): what kernels/dispatch.py's split takes from 235a598 on (`attention_cost.split_call_seconds`)
    splittable: bool = False
    gqa: bool = False  # fewer K/V than query heads: the split takes it only where forced from b77bec6 on

    @staticmethod
    def dense(nq: int, nk: int, causal: bool) -> "AttnCall":
        return AttnCall(((int(nq), int(nk)),), causal)

    @staticmethod
    def varlen(docs, causal: bool = True, with_bounds: bool = False) -> "AttnCall":
        return AttnCall(tuple((int(n), int(n)) for n in docs if n > 0), causal, with_bounds)

    @property
    def is_varlen(self) -> bool:
        return len(self.segments) > 1

    def rows(self) -> int:
        return sum(q + k for q, k in self.segments)

    def pairs(self) -> float:
        if self.causal:
            return float(sum(q * k - q * (q - 1) // 2 for q, k in self.segments))
        return float(sum(q * k for q, k in self.segments))

    def waste(self) -> float:
        return float(sum(q * min(q, TILE) / 2 for q, _ in self.segments)) if self.causal else 0.0


def attn_features(call: AttnCall, heads: int, head_dim: int, head_dim_rate: dict | None = None
                  ) -> tuple[float, float, float]:
    """(FLOPs, rows scaled to REF_HD, calls): the coefficients of (1/rate, per_token, per_call).
    `head_dim_rate`: the kernel's speed at each head dim relative to 128 (default HEAD_DIM_RATE)."""
    flops = ATTN_FWD_BWD * 4 * heads * head_dim * (call.pairs() + call.waste())
    flops /= (HEAD_DIM_RATE if head_dim_rate is None else head_dim_rate).get(head_dim, 1.0)
    return flops, call.rows() * heads * head_dim / REF_HD, 1.0


def attn_time(fit: AttnFit, calls, heads: int, head_dim: int) -> float:
    total = 0.0
    for call in calls:
        flops, rows, n = attn_features(call, heads, head_dim)
        total += flops / fit.rate + rows * fit.per_token + n * fit.per_call
    return total


def linear_attn_time(tokens: float, heads: int, dk: int, dv: int, tokens_per_s: float, ref_hdd: int) -> float:
    """Forward + backward of the lightning kernel over `tokens` at the measured rate for ref_hdd = H*Dk*Dv."""
    return tokens / tokens_per_s * (heads * dk * dv) / ref_hdd


def matmul_time(flops: float, cluster, efficiency: float | None = None) -> float:
    return flops / (cluster.peak_flops * (efficiency or cluster.matmul_efficiency))


def elementwise_parts(model_cfg, kind: str, tp: int, act: int = 2, sp: bool = True) -> dict[str, float]:
    """Bytes one token moves through the element-wise kernels of one layer, forward + backward, by
    kind: `norms` and `rope` (seqpar's Triton kernels since the 2026-11-25 kernels work), `other`
    (residual adds, casts, SwiGLU, lightning's gates: eager torch ops). Each pass reads and writes
    its tensors once (backward ~ twice the forward's traffic). The residual stream is bf16 unless
    `model.fp32_residual` (then fp32, cast for each block input). With Megatron-SP (`sp`) the norms
    and the residual stream hold 1/tp of the tokens on each rank."""
    from seqpar.model.transformer import head_dim

    p = 4 if getattr(model_cfg, "fp32_residual", False) else act
    d, hd, ffn = model_cfg.d_model, head_dim(model_cfg), model_cfg.ffn_dim
    q, kv = model_cfg.n_heads * hd // tp, model_cfg.n_kv_heads * hd // tp
    split = tp if sp else 1
    norms = 2 * (p * d + act * d) / split  # two RMSNorms: residual dtype in, bf16 out
    residual = 2 * 3 * p * d / split  # two adds, read two write one
    casts = 2 * (p + act) * d / split if p != act else 0.0  # an fp32 stream cast for the block inputs
    swiglu = 3 * act * ffn // tp  # silu(w1 x) * w3 x: read two, write one
    rope = 2 * 2 * act * (q + kv) if kind == "S" else 0.0
    out = {"norms": 3.0 * norms, "rope": 3.0 * rope, "other": 3.0 * (residual + casts + swiglu)}
    if kind != "S":
        # LinearAttention's eager ops over the heads' width, counted forward and backward (not 3x the
        # forward): silu(q), silu(k), sigmoid(g) read one and write one forward, read two and write one
        # backward; o * gate reads two, writes one forward, twice that backward: 24 passes. Its output
        # norm is seqpar's Triton RMSNorm over each head (one read and write forward, ~2x backward).
        # (Before: 9 forward passes x 3, for gates and norm at the eager factor, which put the
        # hybrid_1b dp2 step of the 2026-11-26 H100 profile ~6 ms per linear layer over; the profile's
        # eager ops differ by ~1 ms per layer between hybrid_1b and llama_1b.)
        out["other"] += 24 * act * q
        out["norms"] += 3 * 2 * act * q
    return out


def elementwise_bytes_per_token(model_cfg, kind: str, tp: int, act: int = 2, sp: bool = True) -> float:
    return sum(elementwise_parts(model_cfg, kind, tp, act, sp).values())


def elementwise_time(model_cfg, kind, tp, sp, tokens, calib, hbm, torch_ops: bool) -> float:
    """Seconds of one layer's element-wise passes: with seqpar's Triton kernels (`torch_ops` False)
    the norms and RoPE run at their measured share of HBM bandwidth and the rest at the fitted
    eager factor; with the torch ops of earlier runs everything runs at the eager factor."""
    parts = elementwise_parts(model_cfg, kind, tp, sp=sp)
    if torch_ops:
        return sum(parts.values()) * tokens * calib.elementwise_factor / hbm
    # under Megatron-SP the norms' inputs are DTensors, which kernels/dispatch.py keeps on torch's ops
    norm_cost = calib.elementwise_factor if tp > 1 and sp else 1 / calib.fused_norm_eff
    return tokens / hbm * (parts["norms"] * norm_cost + parts["rope"] / calib.fused_rope_eff
                           + parts["other"] * calib.elementwise_factor)


def loss_bytes_per_token(vocab: int) -> float:
    """The chunked cross-entropy: fp32 logits written and read back, softmax, its gradient in bf16."""
    return vocab * (4 * 3 + 2 * 2)
