"""Training FLOPs of one packed sequence, from the model config alone (no model is built).

Conventions, chosen so that seqpar's MFU is comparable with the anchor's
(/work/shared/anchors/anchors_e2e.py: `6*N*S + 3*(2*S*S*Dm)*L`):

- Matmul work is 6 FLOPs per parameter per token (2 forward, 4 backward) over the parameters that
  do a matmul: everything except the input embedding table (a gather), output head included.
  The anchor's N also counts the embedding table; `include_embedding=True` reproduces its number.
- Softmax attention counts qk^T and pv at 2 FLOPs per multiply-add over the causal half of each
  document: 2 * 2 * H * D * l^2 / 2 forward, times 3 for forward + backward. That is the anchor's
  2*S^2*Dm per layer for one document (H * D = Dm) and the README's "causal sum(l_i^2)". The exact
  causal count l(l+1)/2 differs by l/2 per document, under 0.01% at 16k tokens; keeping the
  anchor's form keeps the two MFUs directly comparable.
- Linear (lightning) attention counts its state work: per token and head, k^T v into the state
  (2 * Dk * Dv) and q times the state (2 * Dk * Dv), times 3 for forward + backward. The chunked
  kernels' intra-chunk quadratic term (~2 * 2 * H * D * C / 2 per token for chunk size C), the
  decays and the output norm are left out: they depend on the kernel, not the model.
- Norms, activations, RoPE and the softmax's exp are not counted (as in the anchor).
"""
from __future__ import annotations

import torch

from seqpar.model.transformer import head_dim, layer_types


def block_params(cfg) -> dict[str, int]:
    """Parameters of one block, by layer type (S softmax, L linear)."""
    d, hd, H, Hkv = cfg.d_model, head_dim(cfg), cfg.n_heads, cfg.n_kv_heads
    attention = {
        "S": d * H * hd + 2 * d * Hkv * hd + H * hd * d,
        "L": 4 * d * H * hd + H * hd * d + hd,  # q, k, v, gate, out; the per-head output norm
    }
    return {kind: n + 2 * d + 3 * d * cfg.ffn_dim for kind, n in attention.items()}


def count_params(cfg, *, exclude_embedding: bool = False) -> int:
    """The parameter count of `Transformer(cfg)`, from the config (equals `Transformer.num_params`)."""
    d = cfg.d_model
    tied = bool(getattr(cfg, "tie_embeddings", False))
    blocks = sum(block_params(cfg)[kind] for kind in layer_types(cfg))
    embedding = 0 if exclude_embedding and not tied else cfg.vocab_size * d
    head = 0 if tied else cfg.vocab_size * d
    return embedding + blocks + d + head


def layer_flops(cfg, doc_lengths: list[int] | torch.Tensor) -> list[float]:
    """Forward + backward FLOPs of each block on one packed sequence (the pipeline's cost model)."""
    lengths = [int(n) for n in (doc_lengths.tolist() if isinstance(doc_lengths, torch.Tensor) else doc_lengths)]
    tokens = sum(lengths)
    hd, H = head_dim(cfg), cfg.n_heads
    attention = {"S": 3 * 2 * 2 * H * hd * sum(n * n for n in lengths) / 2,
                 "L": 3 * 2 * 2 * H * hd * hd * tokens}
    params = block_params(cfg)
    return [float(6 * params[kind] * tokens + attention[kind]) for kind in layer_types(cfg)]


def step_flops(cfg, doc_lengths: list[int] | torch.Tensor, *, include_embedding: bool = False) -> float:
    """Forward + backward FLOPs of one packed sequence made of documents of `doc_lengths` tokens."""
    lengths = [int(n) for n in (doc_lengths.tolist() if isinstance(doc_lengths, torch.Tensor) else doc_lengths)]
    blocks = sum(block_params(cfg)[kind] for kind in layer_types(cfg))
    outside_blocks = count_params(cfg, exclude_embedding=not include_embedding) - blocks
    return float(6 * outside_blocks * sum(lengths)) + sum(layer_flops(cfg, lengths))
