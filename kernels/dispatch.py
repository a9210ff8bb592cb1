"""The one place that decides which implementation runs an op.

Every public kernel in `seqpar.kernels` asks `backend(op, *tensors, **features)` and runs what it
names. Names returned today:

- ``"reference"``: the pure-torch code in ``kernels/<op>/reference.py`` (always correct, any device)
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash_attn, dense, CUDA)
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (flash_attn, packed documents, CUDA)
- ``"torch"``: the fused op torch ships (rms_norm -> ``torch.nn.functional.rms_norm``, CUDA)
- ``"triton"``: seqpar's own kernel in ``kernels/<op>/triton.py`` (lightning_attn, CUDA)
- ``"aten_flash"`` / ``"aten_cudnn"``: the FlashAttention-2 / cuDNN ops behind SDPA, called
  directly for what the public entry points do not give: flash_attn's lse (outside autograd) and
  flash_attn_backward from a given (out, lse) (``kernels/flash_attn/aten.py``, CUDA)

Later issues add more ``"triton"`` ops. ``SEQPAR_KERNELS=reference`` forces the reference everywhere (read
on every call so that tests and benchmarks can flip it without re-importing).
``SEQPAR_ATTN_KERNEL=flash|cudnn`` picks the family of the lse paths (default: cuDNN where it applies,
it is the faster one on H100/H200) so that benchmarks can compare both and a faulty one can be avoided.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

OPS = ("flash_attn", "flash_attn_backward", "lightning_attn", "rms_norm", "apply_rotary", "rotary_cos_sin",
       "fused_linear_cross_entropy")
ENV = "SEQPAR_KERNELS"
ATTN_ENV = "SEQPAR_ATTN_KERNEL"

_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@lru_cache(maxsize=None)
def has_varlen_attn() -> bool:
    # torch.nn.attention.varlen appeared in torch 2.10; find_spec fails on the parent for older ones.
    try:
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=None)
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def backend(op: str, *tensors: torch.Tensor | None, **features) -> str:
    """Name the implementation that runs `op` on these tensors.

    `features` are the call's options that change what a fast path can do; for flash_attn:
    `return_lse`, `cu_seqlens`, `cu_seqlens_q`, `cu_seqlens_k` (as passed to the op).
    """
    if op not in OPS:
        raise ValueError(f"unknown kernel op {op!r}; known: {', '.join(OPS)}")
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "auto", "reference"):
        raise ValueError(f"{ENV}={forced!r} is not one of: reference, auto")
    present = [t for t in tensors if t is not None]
    if forced == "reference" or not present or not all(t.is_cuda for t in present):
        return "reference"
    if op == "flash_attn":
        return _flash_attn_backend(*present[:3], **features)
    if op == "flash_attn_backward":
        return _lse_backend(*present[:3], **features)
    if op == "rms_norm":
        return "torch"
    if op == "lightning_attn":
        return _lightning_attn_backend(*tensors[:4])
    return "reference"


def _flash_attn_backend(q, k, v, *, return_lse=False, cu_seqlens=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, needs_grad=False, **features) -> str:
    if return_lse:
        # The aten ops' lse has no autograd formula: a caller that differentiates through this
        # call gets the reference; ring attention runs it inside its own autograd.Function.
        return "reference" if needs_grad else _lse_backend(q, k, v, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                                                           cu_seqlens_k=cu_seqlens_k, **features)
    # A packed row that is one document (boundaries [0, S]: known from the shape alone, no host
    # sync) is the dense case: cuDNN through SDPA, the fastest kernel on H100 (llama_1b at 16k).
    one_document = all(c is None or c.numel() == 2 for c in (cu_seqlens, cu_seqlens_q, cu_seqlens_k))
    if one_document:
        # SDPA's causal mask is top-left aligned; with equal lengths that is the same as ours.
        return "sdpa" if q.shape[1] == k.shape[1] else "reference"
    # The flash kernel behind varlen_attn aligns causal masks bottom-right and zeroes rows with no
    # visible key, as the reference does (checked on an H100, torch 2.11: tests/test_kernels.py, gpu).
    if has_varlen_attn() and q.dtype in _FLASH_DTYPES:
        return "varlen"
    return "reference"


# bf16 only for now: on an H100 (2026-11-25) the fp16 case with Dk=64, Dv=32 hit an illegal memory
# access and poisoned the fp32 cases after it; bf16 passed every case (tests/test_lightning_triton.py)
_LIGHTNING_DTYPES = (torch.bfloat16,)


def _lightning_attn_backend(q, k, v, log_decay) -> str:
    # fp64 and gradients into log_decay stay with the reference (the model's decay is a buffer).
    # The kernel holds a Dk x (Dv or Dv/2) fp32 state block in registers: head dims up to 128.
    if not has_triton() or q.dtype not in _LIGHTNING_DTYPES or log_decay.requires_grad:
        return "reference"
    if max(q.shape[-1], v.shape[-1]) > 128 or q.shape[0] * q.shape[1] == 0:
        return "reference"
    return "triton"


def _lse_backend(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, **_) -> str:
    """aten_flash / aten_cudnn / reference for attention that returns (or consumes) its lse."""
    choice = os.environ.get(ATTN_ENV, "").strip().lower()
    if choice not in ("", "auto", "flash", "cudnn"):
        raise ValueError(f"{ATTN_ENV}={choice!r} is not one of: auto, flash, cudnn")
    D = q.shape[-1]
    if q.dtype not in _FLASH_DTYPES or D % 8 or D > 256:
        return "reference"
    if cu_seqlens is not None or cu_seqlens_q is not None:
        return "aten_flash"  # cuDNN's packed path is not exposed with an lse here
    # Causal with Sq != Sk: the kernels disagree on the mask's alignment; only the reference is sure.
    if causal and q.shape[1] != k.shape[1]:
        return "reference"
    if choice != "flash" and q.shape[2] == k.shape[2]:  # cuDNN here takes no GQA
        return "aten_cudnn"
    return "aten_flash"
