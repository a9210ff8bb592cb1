"""The layers of a seqpar decoder: RMSNorm, SwiGLU, softmax (GQA + RoPE) and lightning attention.

Every weight is a plain `nn.Linear` or `nn.Parameter` with its own name, so tensor parallelism can
shard them from outside: `wq, wk, wv, wg, w1, w3` column-parallel, `wo, w2` row-parallel. Head
counts are recovered from the projection widths (`view(B, S, -1, D)`), so a tp shard that holds a
slice of the heads runs the same code.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seqpar import kernels
from seqpar.attention import AttnContext, linear_attention, softmax_attention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x); w1 and w3 stay separate so each shards column-wise on its own.

    `chunk_tokens > 0` (set from `train.mlp_chunk_tokens`) runs sequences longer than that in
    chunks of that many positions, so the four `[S, ffn_dim]` intermediates (w1 x, its silu, w3 x,
    their product) never exist for the whole sequence: the same math, token by token."""

    def __init__(self, d_model: int, ffn_dim: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)
        self.chunk_tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.chunk_tokens or x.shape[1] <= self.chunk_tokens:
            return self._mlp(x)
        # each chunk is checkpointed: autograd would otherwise save every chunk's intermediates,
        # and they would add up to the whole sequence's again; backward recomputes one at a time
        return torch.cat([checkpoint(self._mlp, chunk, use_reentrant=False)
                          for chunk in x.split(self.chunk_tokens, dim=1)], dim=1)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SoftmaxAttention(nn.Module):
    """Causal grouped-query attention with rotary positions, per document through `ctx`."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, -1, self.head_dim)
        k = self.wk(x).view(B, S, -1, self.head_dim)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        cos, sin = rope
        q, k = kernels.apply_rotary(q, cos, sin), kernels.apply_rotary(k, cos, sin)
        o = softmax_attention(q, k, v, ctx)
        return self.wo(o.reshape(B, S, -1))


def transnormer_log_decay(n_heads: int, layer_idx: int, n_layers: int) -> torch.Tensor:
    """Per-head log decay of TransNormerLLM (Qin et al. 2023, and MiniMax-01's lightning layers).

    Head h gets the ALiBi slope 2^(-8h/H) (h = 1..H; non-powers of two interleave the next power's
    slopes, as ALiBi does), scaled down linearly with depth, so the first layer is the most local
    and the last one nearly a plain cumulative sum. The 1e-5 keeps the last layer's decay strictly
    below one: an undecayed state grows without bound over a long document.
    """
    def slopes(n: int) -> list[float]:
        if math.log2(n).is_integer():
            start = 2.0 ** (-8.0 / n)
            return [start ** (i + 1) for i in range(n)]
        p = 2 ** math.floor(math.log2(n))
        return slopes(p) + slopes(2 * p)[0::2][: n - p]

    depth = 1.0 - layer_idx / (n_layers - 1) if n_layers > 1 else 1.0
    rate = torch.tensor(slopes(n_heads), dtype=torch.float64) * (depth + 1e-5)
    return -rate


LINEAR_DECAYS = {"transnormer": transnormer_log_decay}


class LinearAttention(nn.Module):
    """Lightning attention in TransNormerLLM's form: o = wo(norm(attn(silu(q), silu(k), v)) * sigmoid(wg x)).

    The decays are fixed (a buffer, not a parameter): TransNormerLLM found learned decays no better,
    and fixed ones keep LASP's chunk-state algebra independent of the weights. The output norm runs
    over each head's own channels (not the whole d_model), so a tp shard of heads needs no
    all-reduce for it; it replaces the softmax's normaliser, which linear attention lacks.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, layer_idx: int, n_layers: int,
                 decay: str = "transnormer", eps: float = 1e-5):
        super().__init__()
        if decay not in LINEAR_DECAYS:
            raise ValueError(f"model.linear_decay={decay!r}: unknown decay schedule; use one of {sorted(LINEAR_DECAYS)}")
        self.head_dim = head_dim
        self.decay_args = (decay, n_heads, layer_idx, n_layers)
        self.head_shard = (0, 1)  # (rank, count): tensor parallelism keeps the decays of its own heads
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wg = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.out_norm = RMSNorm(head_dim, eps)
        # not persistent: it is a function of the config, and a checkpoint of a model built on the
        # meta device must not carry (or demand) it
        self.register_buffer("log_decay", self._log_decay(torch.float32), persistent=False)

    def _log_decay(self, dtype: torch.dtype) -> torch.Tensor:
        decay, n_heads, layer_idx, n_layers = self.decay_args
        rank, count = self.head_shard
        return LINEAR_DECAYS[decay](n_heads, layer_idx, n_layers).chunk(count)[rank].to(dtype)

    def shard_heads(self, rank: int, count: int) -> None:
        """Keep the decays of heads [rank/count, (rank+1)/count) (the tp shard of wq/wk/wv)."""
        self.head_shard = (rank, count)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        # `model.to(bf16)` casts buffers too; decays at bf16 precision shift long-range weights by
        # ~1%, so the decay is rebuilt at fp32 at least (fp64 in fp64 test runs)
        dtype = torch.promote_types(self.log_decay.dtype, torch.float32)
        self.log_decay = self._log_decay(dtype).to(self.log_decay.device)

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope=None) -> torch.Tensor:
        B, S, _ = x.shape
        q = F.silu(self.wq(x)).view(B, S, -1, self.head_dim)
        k = F.silu(self.wk(x)).view(B, S, -1, self.head_dim)
        v = self.wv(x).view(B, S, -1, self.head_dim)
        o = linear_attention(q, k, v, self.log_decay, ctx)
        o = self.out_norm(o).reshape(B, S, -1)
        return self.wo(o * torch.sigmoid(self.wg(x)))
