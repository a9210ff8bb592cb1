"""The one place that decides which implementation runs an op.

Every public kernel in `seqpar.kernels` asks `backend(op, *tensors, **features)` and runs what it
names. Names returned today:

- ``"reference"``: the pure-torch code in ``kernels/<op>/reference.py`` (always correct, any device)
- ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` (flash_attn, dense, CUDA)
- ``"varlen"``: ``torch.nn.attention.varlen.varlen_attn`` (flash_attn, packed documents, CUDA)
- ``"torch"``: the fused op torch ships (rms_norm -> ``torch.nn.functional.rms_norm``, CUDA)
- ``"triton"``: seqpar's own kernel in ``kernels/<op>/triton.py`` (lightning_attn, rms_norm up to
  8192 wide, apply_rotary, fused_linear_cross_entropy; CUDA)
- ``"aten_flash"`` / ``"aten_cudnn"``: the FlashAttention-2 / cuDNN ops behind SDPA, called
  directly for what the public entry points do not give: flash_attn's lse (outside autograd) and
  flash_attn_backward from a given (out, lse) (``kernels/flash_attn/aten.py``, CUDA)
- ``"split"``: flash_attn over packed documents (case ``packed``), documents of >= 4096 tokens
  (``SEQPAR_CUDNN_DOC_MIN``) through cuDNN one by one, the rest through one Triton call
  (``kernels/flash_attn/split.py``, CUDA), and its lse form for ring steps and disagg servers
  (case ``packed_lse``, tasks given by query and key boundaries); where ``SPLIT_FASTER`` holds the case or
  ``SEQPAR_ATTN_KERNEL=split`` forces it (elsewhere that setting acts as ``auto``)

Later issues add more ``"triton"`` ops. ``SEQPAR_KERNELS=reference`` forces the reference everywhere (read
on every call so that tests and benchmarks can flip it without re-importing).
``SEQPAR_ATTN_KERNEL=flash|cudnn`` picks the family of the lse paths (default: cuDNN where it applies,
it is the faster one on H100/H200) so that benchmarks can compare both and a faulty one can be avoided;
``"cudnn_graph"`` (cuDNN's graph API: packed rows in one call, causal bottom-right, lse; the
``nvidia-cudnn-frontend`` package, ``kernels/flash_attn/cudnn_graph.py``) takes the cases in
``GRAPH_FASTER`` where it imports and the call fits its bounds; ``SEQPAR_ATTN_KERNEL=graph`` sends it
every flash_attn / flash_attn_backward call it takes; where it does not import, calls dispatch as auto.
``SEQPAR_ATTN_KERNEL=triton`` sends every flash_attn / flash_attn_backward call that seqpar's Triton
kernel takes (CUDA, fp16/bf16, head dim 64 or 128) there. Without it, a case (``attention_case``) goes
to Triton only where the GPU benchmark measured it faster (``TRITON_FASTER``); ``flash_attn_choice``
says which kernel a call gets and why.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

OPS = ("flash_attn", "flash_attn_backward", "lightning_attn", "rms_norm", "apply_rotary", "rotary_cos_sin",
       "fused_linear_cross_entropy", "attn_merge", "block_sum")
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
    if op in ("flash_attn", "flash_attn_backward"):
        if _wants_graph(op, *present[:3], **features):
            return "cudnn_graph"
        if op == "flash_attn":
            name = _flash_attn_backend(*present[:3], **features)
        elif _wants_split(*present[:3], **{**features, "return_lse": True}):
            name = "split"
        elif _wants_triton(*present[:3], **{**features, "return_lse": True}):
            name = "triton"
        else:
            name = _lse_backend(*present[:3], **features)
        # what torch's kernels cannot take (a causal mask with more keys than queries, gradients
        # through the lse) the Triton kernel can: anything beats the reference's S x S matrices
        if name == "reference" and _attn_choice() in _AUTO and triton_flash_applies(*present[:3]):
            name = "triton"
        return name
    if op == "rms_norm":
        return _rms_norm_backend(*present[:2])
    if op == "apply_rotary":
        return _rotary_backend(*present[:3])
    if op == "fused_linear_cross_entropy":
        return _cross_entropy_backend(*present[:2])
    if op == "lightning_attn":
        return _lightning_attn_backend(*tensors[:4])
    if op == "attn_merge":
        return _attn_merge_backend(*tensors[:5])
    if op == "block_sum":
        return _block_sum_backend(*present)
    return "reference"


def _flash_attn_backend(q, k, v, *, return_lse=False, cu_seqlens=None, cu_seqlens_q=None,
                        cu_seqlens_k=None, needs_grad=False, **features) -> str:
    if _wants_split(q, k, v, return_lse=return_lse, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                    cu_seqlens_k=cu_seqlens_k, needs_grad=needs_grad):
        return "split"
    if _wants_triton(q, k, v, return_lse=return_lse, cu_seqlens=cu_seqlens, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k):
        return "triton"  # differentiable through out and lse
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


# fp16 runs as bf16 inside the kernel (see lightning_attn_triton); fp32 stays with the reference: its
# ieee dots make the kernel slower than bf16 and a dense 8k-token case did not finish compiling and
# tuning in 100 s on an H100 (2026-11-27)
_LIGHTNING_DTYPES = (torch.bfloat16, torch.float16)


def _lightning_attn_backend(q, k, v, log_decay) -> str:
    # fp64 and gradients into log_decay stay with the reference (the model's decay is a buffer).
    # The kernel holds a Dk x (Dv or Dv/2) fp32 state block in registers: head dims up to 128.
    if not has_triton() or q.dtype not in _LIGHTNING_DTYPES or log_decay.requires_grad:
        return "reference"
    if max(q.shape[-1], v.shape[-1]) > 128 or q.shape[0] * q.shape[1] == 0:
        return "reference"
    return "triton"


# Element-wise kernels and the cross-entropy pass: fp32 math in registers, so fp64 stays with the
# reference; RMSNorm rows wider than the kernel keeps in registers go to torch's fused op.
_ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _plain(*tensors) -> bool:
    # Triton reads raw storage: a tensor subclass (the DTensors of tensor parallelism's
    # SequenceParallel norms, fake tensors under tracing) goes through ops that know its layout.
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _rms_norm_backend(x, weight=None) -> str:
    if not has_triton() or x.dtype not in _ELEMENTWISE_DTYPES or not _plain(x, weight):
        return "torch"
    from seqpar.kernels.norm_rope.triton import MAX_NORM_DIM  # imports triton: only for CUDA tensors
    return "triton" if x.shape[-1] <= MAX_NORM_DIM else "torch"


def _rotary_backend(x, cos=None, sin=None) -> str:
    if not has_triton() or x.dtype not in _ELEMENTWISE_DTYPES or x.dim() != 4 or not _plain(x, cos, sin):
        return "reference"
    if any(t is not None and t.requires_grad for t in (cos, sin)):
        return "reference"  # gradients into cos/sin only through the reference
    return "triton"


def _attn_merge_backend(old, o, lse, l, out) -> str:
    # the kernel reads rows of the head dim as contiguous tiles of up to 256 values, in fp32 registers
    rows = (old, o, out)
    if not has_triton() or not _plain(*rows, lse, l) or lse.dtype != torch.float32 or l.dtype not in _ELEMENTWISE_DTYPES:
        return "reference"
    if any(t.dtype not in _ELEMENTWISE_DTYPES or t.dim() != 4 or t.stride(-1) != 1 for t in rows) or out.shape[-1] > 256:
        return "reference"
    return "triton"


def _block_sum_backend(out, *parts) -> str:
    # two or three parts, summed in fp32 registers (fp64 sums stay with torch), head-dim tiles of <= 256
    rows = (out, *parts)
    if not has_triton() or not _plain(*rows) or len(parts) not in (2, 3) or out.shape[-1] > 256:
        return "reference"
    if any(t.dtype not in _ELEMENTWISE_DTYPES or t.dim() != 4 or t.stride(-1) != 1 for t in rows):
        return "reference"
    return "triton"


def _cross_entropy_backend(hidden, weight=None) -> str:
    dtypes = [t.dtype for t in (hidden, weight) if t is not None]
    if not has_triton() or any(dt not in _ELEMENTWISE_DTYPES for dt in dtypes) or not _plain(hidden, weight):
        return "reference"
    return "triton"


def _lse_backend(q, k, v, *, causal=True, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, **_) -> str:
    """aten_flash / aten_cudnn / reference for attention that returns (or consumes) its lse."""
    choice = _attn_choice()
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


# ---------------------------------------------------------------- seqpar's Triton flash kernel

ATTN_CHOICES = ("auto", "flash", "cudnn", "triton", "split", "graph")
# "split" forces the split where it applies (split_applies); every other call then dispatches as auto
_AUTO = ("auto", "split", "graph")  # graph: where cuDNN's graph API does not take a call
_TRITON_HEAD_DIMS = (64, 128)
# Cases (attention_case) where the kernels benchmark (`--only flash`) measured the Triton kernel
# faster than torch's cuDNN / flash kernels: on an H100 (2026-11-25, docs/benchmarks/2026-11-25-h100-kernels)
# packed lognormal documents fwd+bwd 344 / 330 TFLOP/s at 16k / 64k against torch's varlen flash
# 289 / 289 (and Flex's document mask 278 / 235); dense rows stay with cuDNN (556 against 394).
TRITON_FASTER: frozenset[str] = frozenset({"packed", "packed_lse"})
# Cases where the split (long documents through cuDNN, kernels/flash_attn/split.py) measured faster
# than the kernel the case gets without it (docs/benchmarks/split_attn_gpu.sh, H100, 2026-11-26,
# docs/benchmarks/2026-11-26-4xh100-5th/call7): packed lognormal rows fwd+bwd 425.6 / 396.3 TFLOP/s
# at 16k / 64k against the Triton kernel's 337.9 / 301.6, and on rows of fresh document lengths
# 7.15 against 7.75 ms per layer (median of 12 rows, 8 layers each) once cuDNN's plans for the
# length buckets exist (all of [4k, 16k] built in 2.7 s; before that each new bucket costs a build,
# ~15 ms per layer on the first rows); with GQA (32/8 heads) the disagg benchmark's data-parallel
# rows ran 16-25% faster on it. "packed_lse" (ring steps, disagg servers: split_tasks.split_forward /
# split_backward, lse-returning, long square tasks through cuDNN): the disagg benchmark's servers
# (2 H100, docs/benchmarks/2026-11-26-4xh100-6th/call2, disagg_gpu.sh with and without it in the
# same call) took 3-12% less time per step (single schedule 64k: wlbllm 56.0 -> 54.3 ms, prolong
# 41.6 -> 38.6, lognormal 59.6 -> 53.1; 128k: 139.9 -> 132.3, 81.8 -> 73.8) and its ring over the
# packed row 4-13% less on four of the five cases (64k: wlbllm 1.631 -> 1.567x the ideal, prolong
# 1.538 -> 1.378, lognormal 1.671 -> 1.569; 128k prolong 1.534 -> 1.339; wlbllm 1.468 -> 1.479).
SPLIT_FASTER: frozenset[str] = frozenset({"packed", "packed_lse"})
# Cases where cuDNN's graph API (a whole packed row in one call, kernels/flash_attn/cudnn_graph.py;
# where nvidia-cudnn-frontend imports and the call fits its bounds) measured faster than the split:
# packed lognormal rows at 32 x 128, fwd+bwd 486.7 / 469.8 TFLOP/s at 16k / 64k against the split's
# 413.8 / 390.5 and FlexAttention's document mask 370.4 / 244.3 in the same run (one H100,
# `bench kernels --only flash`, docs/benchmarks/2026-11-28-gpu-22nd/call1); llama_1b (32/8 x 64) at
# 64k tokens on one GPU ran its 9 steps after the first in 24.0 s against the split's 23.5 (each new
# document-length bucket builds a graph, ~0.3 s). Not "packed_lse": the ring's prefix calls ran 14-18%
# slower on it than on torch's cuDNN op (call2: 32k ring compute 34.8 against 29.5 ms) and disagg's
# servers 27% slower end to end (2 H100, call4 against call3: 2.91 against 2.29 s per step).
GRAPH_FASTER: frozenset[str] = frozenset({"packed"})
# Which documents of a call the split hands to cuDNN depends on the call's query heads too
# (split.min_doc_len: with a tensor-parallel rank's few heads only longer ones; none, one Triton call).


def _attn_choice() -> str:
    choice = os.environ.get(ATTN_ENV, "").strip().lower() or "auto"
    if choice not in ATTN_CHOICES:
        raise ValueError(f"{ATTN_ENV}={choice!r} is not one of: {', '.join(ATTN_CHOICES)}")
    return choice


def _graph_applies(q, k, v, **features) -> bool:
    from seqpar.kernels.flash_attn import cudnn_graph
    return cudnn_graph.applies(q, k, v, **features)


def _wants_graph(op, q, k, v, **features) -> bool:
    """SEQPAR_ATTN_KERNEL=graph: every call the graph family takes; auto: the forward (with its own
    backward through autograd) of the cases in GRAPH_FASTER."""
    choice = _attn_choice()
    if choice != "graph" and not (choice == "auto" and op == "flash_attn"
                                  and attention_case(q, k, **features) in GRAPH_FASTER):
        return False
    return _graph_applies(q, k, v, **features)


def attention_case(q, k, *, return_lse=False, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None, **_) -> str:
    """The case a flash_attn call is benchmarked and dispatched as: dense|packed, plus _lse when the
    caller takes the lse (ring steps, disagg). A packed row of one document is dense."""
    bounds = cu_seqlens if cu_seqlens is not None else cu_seqlens_q
    packed = bounds is not None and len(bounds) > 2
    return ("packed" if packed else "dense") + ("_lse" if return_lse else "")


def triton_flash_applies(q, k, v) -> bool:
    """Whether seqpar's Triton flash kernel takes these tensors (CUDA, fp16/bf16, head dim 64/128)."""
    D = q.shape[-1]
    return (has_triton() and q.is_cuda and q.dtype in _FLASH_DTYPES and k.dtype == q.dtype == v.dtype
            and D in _TRITON_HEAD_DIMS and k.shape[-1] == D and v.shape[-1] == D)


def _wants_triton(q, k, v, **features) -> bool:
    if not triton_flash_applies(q, k, v):
        return False
    choice = _attn_choice()
    if choice == "triton":
        return True
    case = attention_case(q, k, **features)
    # One document given by boundaries, with an lse (a disagg server with one task): cuDNN's lse
    # path takes no boundaries, so torch's kernel is FA2 varlen, slower than this one dense and
    # packed (326/320 against 394/381 TFLOP/s, 2026-11-25-h100-kernels) and, unless told the
    # longest document, reading it on the host at every call.
    bounded = any(features.get(n) is not None for n in ("cu_seqlens", "cu_seqlens_q"))
    return choice in _AUTO and (case in TRITON_FASTER or (case == "dense_lse" and bounded))


def split_applies(q, k, v, *, return_lse=False, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                  **_) -> bool:
    """Whether the split takes this flash_attn call: a packed row of self-attention (shared
    boundaries, equal lengths) without lse, on tensors the Triton kernel takes, with cuDNN present.
    From the shapes alone: whether the row holds a long document is known only inside the split."""
    shared = cu_seqlens if cu_seqlens is not None else (cu_seqlens_q if cu_seqlens_q is cu_seqlens_k else None)
    return (shared is not None and not return_lse and q.shape[1] == k.shape[1]
            and attention_case(q, k, cu_seqlens=shared) == "packed" and triton_flash_applies(q, k, v)
            and torch.backends.cudnn.is_available())


def task_split_applies(q, k, v, *, return_lse=False, cu_seqlens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                       needs_grad=False, **_) -> bool:
    """Whether the split's lse form takes this call (`split_tasks.split_forward` / `split_backward`):
    packed documents or tasks given by boundaries (shared, or separate for queries and keys), the
    lse taken, no autograd through it (ring steps and disagg servers run their own backward), on
    tensors the Triton kernel takes, with cuDNN present. Its long square tasks go to cuDNN."""
    bounded = cu_seqlens is not None or (cu_seqlens_q is not None and cu_seqlens_k is not None)
    return (bounded and return_lse and not needs_grad and triton_flash_applies(q, k, v)
            and torch.backends.cudnn.is_available())


def split_may_run() -> bool:
    """Whether any call may go to the split under this process's setting (what its cuDNN plans
    are prebuilt for, `split.prebuild_plans`)."""
    choice = _attn_choice()
    return choice == "split" or (choice in _AUTO and bool(SPLIT_FASTER))


def _wants_split(q, k, v, **features) -> bool:
    choice = _attn_choice()
    if choice not in _AUTO:
        return False
    if split_applies(q, k, v, **features):
        return choice == "split" or "packed" in SPLIT_FASTER
    if task_split_applies(q, k, v, **features):
        return choice == "split" or "packed_lse" in SPLIT_FASTER
    return False


def prefix_calls_fast(q, k, v) -> bool:
    """Whether a causal call with an lse of some queries over a longer prefix of keys (aligned
    bottom-right: a varlen call of one document) runs on the kernel a square dense call of these
    heads runs on, so that one call over the prefix beats a full rectangle and a causal diagonal:
    FA2 (its varlen kernel aligns bottom-right), seqpar's Triton kernel and cuDNN's graph API take
    both. torch's cuDNN op aligns a causal mask top-left when Sq < Sk (measured,
    2026-11-27-gpu-16th/call2): there a prefix call would leave cuDNN for FA2; and where the bounded
    call would go to the split (auto dispatch), its pieces are not measured against the two dense
    calls: no."""
    fast = ("aten_flash", "triton", "cudnn_graph")
    one_document = {"cu_seqlens_q": (0, q.shape[1]), "cu_seqlens_k": (0, k.shape[1])}
    return (backend("flash_attn_backward", q, k, v) in fast
            and backend("flash_attn_backward", q, k, v, **one_document) in fast)


def flash_attn_choice(q, k, v, *, backward=False, **features) -> tuple[str, str]:
    """(backend name, why) of a flash_attn call (or its backward): the attention dispatcher's
    answer to "which kernel runs this case", for logs and benchmark tables."""
    op = "flash_attn_backward" if backward else "flash_attn"
    name = backend(op, q, k, v, **features)
    case = attention_case(q, k, return_lse=backward or features.get("return_lse", False), **{
        n: features.get(n) for n in ("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k")})
    choice = _attn_choice()
    if name == "split":
        why = (f"{ATTN_ENV}=split" if choice == "split"
               else f"case {case}: the split (long documents through cuDNN) measured faster (SPLIT_FASTER)")
    elif name == "triton":
        why = f"{ATTN_ENV}=triton" if choice == "triton" else f"case {case}: measured faster than cuDNN/flash"
    elif name == "reference":
        why = "no fast kernel takes this call (device, dtype, head dim, mask alignment or lse gradients)"
    elif name == "cudnn_graph":
        why = (f"{ATTN_ENV}=graph" if choice == "graph"
               else f"case {case}: cuDNN's graph API (one call per row) measured faster (GRAPH_FASTER)")
    elif choice in ("flash", "cudnn"):
        why = f"{ATTN_ENV}={choice}"
    elif triton_flash_applies(q, k, v):
        why = f"case {case}: not measured faster with Triton (TRITON_FASTER), torch's kernel kept"
    else:
        why = f"case {case}: the Triton kernel does not take these tensors"
    return name, why


def tails_overlap(q, k, v) -> bool:
    """Whether two attention calls in a row gain from running on two streams (the first on a
    high-priority one: `ring.Tails`), the second filling the SMs that the first's last wave leaves
    idle: FA2 only. One rank's calls of a 32k ring of 2 (one H200, fwd+bwd, 2026-11-28-gpu-32nd/call2):
    FA2 0.976 -> 0.987 of the one-GPU time, cuDNN 0.974 -> 0.981, seqpar's Triton kernel lost (0.998 ->
    0.983); the ring on 2 H200 (call3, A B A B): FA2 0.943 / 0.946 against 0.938 / 0.937 (compute-only
    0.5 ms less), cuDNN 0.916 / 0.916 against 0.926 / 0.927 (beside the transfers it lost). CUDA only."""
    return backend("flash_attn_backward", q, k, v) == "aten_flash"
