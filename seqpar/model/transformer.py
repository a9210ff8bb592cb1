"""The seqpar decoder: embedding -> blocks (softmax or lightning attention, SwiGLU) -> norm -> head.

Plain PyTorch that knows nothing of ranks: it sees this rank's shard of tokens and an
`AttnContext`; parallelism (tp, activation checkpointing, FSDP) is applied to `layers` from outside.
"""
from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from seqpar import kernels
from seqpar.attention import AttnContext
from seqpar.model.layers import LinearAttention, RMSNorm, SoftmaxAttention, SwiGLU

LAYER_TYPES = "SL"


def layer_types(cfg) -> str:
    """`cfg.layer_pattern` tiled to `cfg.n_layers`, one character per layer (S softmax, L linear)."""
    pattern = cfg.layer_pattern
    bad = sorted(set(pattern) - set(LAYER_TYPES))
    if not pattern or bad:
        raise ValueError(f"model.layer_pattern={pattern!r}: unknown layer types {bad or '(empty)'}; "
                         "use S (softmax attention) and L (linear attention)")
    return "".join(pattern[i % len(pattern)] for i in range(cfg.n_layers))


def head_dim(cfg) -> int:
    return cfg.head_dim or cfg.d_model // cfg.n_heads


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int, kind: str):
        super().__init__()
        hd = head_dim(cfg)
        self.kind = kind
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if kind == "S":
            self.attention = SoftmaxAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, hd)
        else:
            self.attention = LinearAttention(cfg.d_model, cfg.n_heads, hd, layer_idx, cfg.n_layers,
                                             decay=getattr(cfg, "linear_decay", "transnormer"), eps=cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.feed_forward = SwiGLU(cfg.d_model, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), ctx, rope)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.head_dim = head_dim(cfg)
        self.rope_theta = cfg.rope_theta
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layer_types = layer_types(cfg)
        # keyed by global layer index: a pipeline stage keeps its own layers under their full-model
        # names, so initialisation and checkpoints do not depend on the stage split
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, kind) for i, kind in enumerate(self.layer_types)})
        # layer names per chunk that one forward call runs: a pipeline rank with interleaved
        # virtual stages holds several non-contiguous runs of layers
        self.chunks = [list(self.layers.keys())]
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tied = bool(getattr(cfg, "tie_embeddings", False))
        if self.tied:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, input_ids: torch.Tensor, ctx: AttnContext | None = None, *,
                targets: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """Hidden states `[B, S_local, d_model]` after the final norm; with `targets`, their loss sum.

        The loss goes through forward (not only `loss_sum`) because FSDP gathers the root's
        parameters, `output.weight` among them, in forward hooks. A pipeline stage runs the layers
        of `self.chunks[chunk]`: it embeds only when it holds the embedding and runs its first
        chunk, else takes hidden states as `input_ids`; it returns its last layer's output unless
        it holds the final norm and runs its last chunk."""
        ctx = AttnContext() if ctx is None else ctx
        embed = chunk == 0 and self.tok_embeddings is not None
        h = self.tok_embeddings(input_ids) if embed else input_ids
        h = h.to(residual_dtype(self.cfg, h))
        rope = self.rotary(input_ids.shape[1], ctx, input_ids.device)
        for name in self.chunks[chunk]:
            h = self.layers[name](h, ctx, rope)
        if self.norm is None or chunk != len(self.chunks) - 1:
            return h
        h = self.norm(h)
        return h if targets is None else self.loss_sum(h, targets)

    def rotary(self, seq_len: int, ctx: AttnContext, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin for this shard's tokens, computed once per step and shared by every softmax layer."""
        if "S" not in self.layer_types:
            return None
        positions = ctx.position_ids if ctx.position_ids is not None else torch.arange(seq_len, device=device)
        return kernels.rotary_cos_sin(positions.to(device), self.head_dim, self.rope_theta)

    def loss_sum(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of next-token cross-entropies over targets != -100; the `[N, V]` logits never exist.

        A head sharded over the vocabulary (a DTensor: tensor parallelism shards it by rows) takes
        the vocabulary-parallel loss, each rank computing its slice of every token's logits."""
        weight = self.output.weight
        if isinstance(weight, DTensor):
            from seqpar.parallel.vocab_parallel import vocab_parallel_cross_entropy

            mesh, local = weight.device_mesh, weight.to_local()
            return vocab_parallel_cross_entropy(hidden, local, targets, group=mesh.get_group(),
                                                vocab_start=mesh.get_local_rank() * local.shape[0], ignore_index=-100)
        return kernels.fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(init_std) weights, out projections (`wo`, `w2`) scaled by 1/sqrt(2 n_layers) (GPT-2's
        residual scaling), norm gains one.

        Each tensor is drawn on the CPU in blocks of `INIT_BLOCK` elements, each from its own
        generator seeded by `seed`, the parameter's name and the block's index, then copied to its
        device and dtype: the weights do not depend on the device, on the world size (DTensor
        shards take their slice of the same full draw), on which layers a pipeline stage holds, or
        on the threads that draw the blocks (all the host's cores: one thread draws ~170M numbers
        a second, 50 s for llama_8b). `seed=None` draws the base seed from torch's global generator.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for name, p in self.named_parameters():
                name = canonical_name(name)
                leaf = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
                if "norm" in leaf:
                    full = torch.ones(p.shape, dtype=torch.float32)
                else:
                    full = _normal(p.shape, (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63, pool)
                    full *= residual_std if leaf in ("wo", "w2") else std
                copy_full(p, full)
        for module in self.modules():
            if isinstance(module, LinearAttention):
                module.reset_buffers()

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameters counted once each (tied weights once); `exclude_embedding` drops the input
        table, which does no matmul, unless it is tied to the output head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.tied:
            n -= self.tok_embeddings.weight.numel()
        return n


def residual_dtype(cfg, h: torch.Tensor) -> torch.dtype:
    """The residual stream's dtype: the autocast dtype unless `cfg.fp32_residual` (or no autocast)."""
    device = h.device.type
    if torch.is_autocast_enabled(device) and not getattr(cfg, "fp32_residual", False):
        return torch.get_autocast_dtype(device)
    return h.dtype


def canonical_name(name: str) -> str:
    """The parameter's name with wrapper modules (activation checkpointing, compile) removed."""
    return ".".join(part for part in name.split(".") if part not in ("_checkpoint_wrapped_module", "_orig_mod"))


INIT_BLOCK = 1 << 22  # elements per generator in init_weights (fixed: the draw must not depend on threads)


def _normal(shape, seed: int, pool: ThreadPoolExecutor) -> torch.Tensor:
    """Standard normal numbers, block b of the flattened tensor drawn from generator (seed, b)."""
    full = torch.empty(shape, dtype=torch.float32)
    flat = full.view(-1)

    def draw(start: int) -> None:
        gen = torch.Generator().manual_seed((seed + 7_919 * (start // INIT_BLOCK)) % 2**63)
        torch.randn(min(INIT_BLOCK, flat.numel() - start), generator=gen, out=flat[start:start + INIT_BLOCK])

    list(pool.map(draw, range(0, flat.numel(), INIT_BLOCK)))  # ATen releases the GIL: threads run in parallel
    return full


def copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(p, DTensor):
        # every rank drew the same full tensor: each keeps its own slice, no communication
        full = distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(full.to(p.dtype))
