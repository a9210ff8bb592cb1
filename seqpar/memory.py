"""Memory per rank, predicted from the config before anything is allocated.

`estimate(cfg, world)` returns the bytes of the busiest rank (the pipeline stage that holds the
most), split into what lives for the whole run (parameters, gradients, AdamW's two moments, all
sharded by FSDP2 over dp x cp; tp splits the block weights, pp keeps a stage's layers), what one
step saves for backward (per layer, under the chosen activation checkpointing), and the largest
transient on top (one layer's recompute, one MLP chunk, one cross-entropy chunk, FSDP's gathered
weights, the sequence-parallel method's buffers).

Activations count the tensors the CUDA path saves for backward (bf16 under autocast, residual
stream and norms in the parameter dtype), per token of a layer:

- RMSNorm (fused): its input and the fp32 rstd. Under autocast every linear layer saves its own
  bf16 copy of its input (autocast casts per call), so wq/wk/wv save three; without autocast the
  one input is shared.
- softmax attention (flash, ring): q, k, v, the output (also wo's input) and the lse; RoPE saves
  only cos/sin, which are shared by all layers.
- lightning attention: the silu inputs of q and k, the kernel's q/k/v, the output norm's input,
  the normed output, the gate's sigmoid and wo's input (nine q-sized tensors).
- SwiGLU: w1 x, its silu, w3 x and their product (w2's input): four ffn_dim-sized tensors.

Under autocast each linear also saves the bf16 cast of its weight (there is no cast cache, so
every call casts anew): a layer's weights in bf16, kept with its activations (`none`), or in the
transient of its recompute (`full`; `selective` keeps the attention's and recomputes the MLP's).

Softmax layers that see whole documents on CUDA (cp = 1, or Ulysses) run packed rows through the
split (kernels/flash_attn/split.py): a long document's cuDNN calls add their scratch, which the
split bounds (`split_scratch`: SEQPAR_CUDNN_SCRATCH_MB, 2 GiB by default), to the layer's transient.

On top of the largest transient: three `[S, d]` tensors of the residual stream (a block's input
and output, or the gradients entering and leaving it), which at a million tokens are gigabytes.

On CUDA, a fixed term (`fixed_allocations`) for what the libraries allocate through torch's
caching allocator whatever the model: Triton's autotuner clears the L2 cache between timed
launches with a 256 MiB buffer (`get_empty_cache_for_benchmark` in Triton's CUDA driver; seqpar's
Triton kernels autotune on their first calls, inside step 1's forward and backward) and cuBLAS's
workspace (torch's default on Hopper and later: 32 MiB). It explains the tiny default job's
measured peak (0.287 GiB against 0.026 GiB of model state and activations; docs/sim.md). Under
DeepSpeed ZeRO-1/2 also its gradient reduce bucket (`deepspeed_buckets`): `reduce_bucket_size`
elements (default 5e8: 1.86 GiB in fp32) allocated whatever the model's size, twice with
`overlap_comm`. What the allocator does not count (the CUDA context, NCCL's buffers,
fragmentation) is in `MARGIN`.

The peak is the largest of four moments (`MemoryEstimate.total`). In backward, activations are
freed as gradients are made: all activations and the loss's saved gradients at its start; all
activations and the first layer's transient once the final norm has consumed the loss's tensors
(but the output head's gradient); all gradients and the last layer's transient at its end
(`MemoryEstimate.backward_peak`; earlier micro-batches' gradients on top when accumulating). At the optimizer step: parameters, gradients, moments and
foreach AdamW's temporary, one moment's size (llama_8b on one H200: 150 GiB, whatever the
length). With `train.offload_optimizer` the moments live in host memory and visit the device
bucket by bucket during the step only.

CPU runs use the reference attention kernels, which save quadratic score matrices: the estimate
describes the CUDA kernels, which is where it matters.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

from seqpar.model.transformer import head_dim, layer_types
from seqpar.parallel.optim_offload import DEFAULT_BUCKET_NUMEL

GiB = 2**30
CE_CHUNK = 4096  # rows per chunk of kernels.fused_linear_cross_entropy (its default)
MARGIN = 0.9  # of the device's memory: the CUDA context, the allocator's fragmentation, NCCL's buffers
# allocated through torch's caching allocator on CUDA whatever the model (see the module docstring)
# train.offload_optimizer: the step streams the moments through the device a bucket at a time, and
# three buckets are in flight at most (copy in, update, copy out; seqpar.parallel.optim_offload)
OFFLOAD_BUCKETS_IN_FLIGHT = 3
FIXED_ALLOCATIONS = {"Triton autotuner's L2 flush buffer": 256 << 20, "cuBLAS workspace": 32 << 20}


@dataclass
class MemoryEstimate:
    """Bytes on one rank (the busiest pipeline stage)."""
    params: int
    grads: int
    optimizer: int
    activations: int  # saved for backward by this rank's layers, all micro-batches in flight
    loss: int  # the fused cross-entropy's saved gradients (its chunk of logits is in `transient`)
    transient: int  # the largest short-lived buffer set on top (named in `transient_what`)
    transient_what: str = ""
    head_grad: int = 0  # of `loss`, the output head's gradient: kept through the rest of the backward
    per_layer: dict[str, int] = field(default_factory=dict)  # saved bytes of one layer, by type (S, L)
    stage: int = 0
    layers: int = 0
    tokens: int = 0  # tokens per micro-batch on this rank
    fixed: int = 0  # the libraries' own allocations on CUDA (`FIXED_ALLOCATIONS`, DeepSpeed's buckets)
    optimizer_what: str = "AdamW moments"
    step_temporaries: int = 0  # what the optimizer step allocates on top of the states (foreach temporaries)
    optimizer_in_step_only: bool = False  # train.offload_optimizer: the moments visit the device in the step
    accumulating: bool = False  # gradients of earlier micro-batches are held while later ones run

    @property
    def backward_peak(self) -> int:
        """The highest of three moments of the backward (earlier micro-batches' gradients held at
        each when accumulating): its start, all activations and the loss's saved gradients; the
        first layer it runs through, all activations, the output head's gradient and that layer's
        transient (the final norm's backward has consumed the rest of the loss's); and its end,
        all gradients and the last layer's transient. Activations are consumed as gradients are
        made. Recorded on one H100 (logging.memory_snapshot, llama_1b, 128k tokens, 2026-11-26):
        full checkpointing peaked in the first layer, all 16 block inputs live and the loss's
        tensors gone but one; activation offload peaked late, most gradients made."""
        held = self.params + self.fixed + (0 if self.optimizer_in_step_only else self.optimizer)
        earlier = self.grads if self.accumulating else 0
        start = self.activations + self.loss + earlier
        first_layer = self.activations + self.head_grad + self.transient + earlier
        end = self.grads + self.transient
        return held + max(start, first_layer, end)

    @property
    def step_peak(self) -> int:
        return self.params + self.grads + self.optimizer + self.step_temporaries + self.fixed

    @property
    def total(self) -> int:
        return max(self.backward_peak, self.step_peak)

    @property
    def total_gb(self) -> float:
        return self.total / GiB

    def table(self) -> str:
        rows = [("parameters", self.params), ("gradients", self.grads), (f"optimizer ({self.optimizer_what})", self.optimizer),
                (f"activations ({self.layers} layers x {self.tokens} tokens)", self.activations),
                ("loss (fused cross-entropy)", self.loss), (f"transient ({self.transient_what})", self.transient),
                ("fixed (Triton autotune buffer, cuBLAS workspace" + (", DeepSpeed reduce bucket)"
                                                                     if self.fixed > sum(FIXED_ALLOCATIONS.values())
                                                                     else ")"), self.fixed),
                ("optimizer step's temporaries", self.step_temporaries),
                ("peak (" + ("optimizer step" if self.step_peak > self.backward_peak else "backward") + ")", self.total)]
        width = max(len(name) for name, _ in rows)
        lines = [f"memory per rank (pipeline stage {self.stage}), predicted:"]
        lines += [f"  {name:<{width}}  {b / GiB:9.3f} GiB" for name, b in rows]
        lines += [f"  per layer saved ({kind}): {b / max(self.tokens, 1):,.0f} B/token"
                  for kind, b in sorted(self.per_layer.items())]
        return "\n".join(lines)


def _dtype_bytes(cfg) -> tuple[int, int, bool]:
    """(parameter bytes, activation bytes, autocast) as `seqpar.train` runs it."""
    from seqpar.config import use_cuda
    p = 8 if cfg.train.dtype == "fp64" else 4
    autocast = use_cuda(cfg) and cfg.train.dtype in ("auto", "bf16")
    return p, (2 if autocast else p), autocast


def fixed_allocations(cfg) -> int:
    """Bytes the libraries allocate on every CUDA rank whatever the model (`FIXED_ALLOCATIONS`, and
    DeepSpeed's reduce buckets under its engine); 0 on CPU."""
    from seqpar.config import use_cuda
    return sum(FIXED_ALLOCATIONS.values()) + deepspeed_buckets(cfg) if use_cuda(cfg) else 0


def deepspeed_buckets(cfg) -> int:
    """DeepSpeed ZeRO-1/2's gradient reduce buffer(s): with `contiguous_gradients` (its default)
    each micro-batch's backward stages gradients in `reduce_bucket_size` elements allocated in
    full (DeepSpeed 0.19 `stage_1_and_2.py`, `setup_buckets`) in the parameters' dtype (seqpar's
    are fp32, or fp64); a second one with `overlap_comm`. Read from the pass-through
    `parallel.deepspeed` block, else DeepSpeed's defaults."""
    par = cfg.parallel
    stage = getattr(par, "zero_stage", None) or 2
    if getattr(par, "dp_engine", "fsdp2") != "deepspeed" or stage >= 3:
        return 0
    zero = dict((getattr(par, "deepspeed", None) or {}).get("zero_optimization", None) or {})
    if not zero.get("contiguous_gradients", True):
        return 0
    numel = int(float(zero.get("reduce_bucket_size", 5e8)))
    return numel * _dtype_bytes(cfg)[0] * (2 if zero.get("overlap_comm", False) else 1)


def residual_bytes(cfg) -> int:
    """Bytes of one element of the residual stream (block inputs, norm inputs, what checkpoints keep)."""
    p, a, autocast = _dtype_bytes(cfg)
    return a if autocast and not getattr(cfg.model, "fp32_residual", False) else p


def param_shapes(model_cfg, tp: int, *, layers, first: bool, last: bool) -> list[tuple[int, int]]:
    """(rows, cols) of each parameter of a stage on one tp rank. Column-parallel weights split
    their rows, row-parallel ones (wo, w2) their columns; norms and the embedding/output stay whole."""
    d, hd, ffn = model_cfg.d_model, head_dim(model_cfg), model_cfg.ffn_dim
    q, kv = model_cfg.n_heads * hd, model_cfg.n_kv_heads * hd
    kinds = layer_types(model_cfg)
    shapes = []
    for i in layers:
        shapes += [(d, 1), (d, 1)]  # attention_norm, ffn_norm
        if kinds[i] == "S":
            shapes += [(q // tp, d), (kv // tp, d), (kv // tp, d), (d, q // tp)]
        else:
            shapes += [(q // tp, d)] * 4 + [(d, q // tp), (hd, 1)]  # wq wk wv wg, wo, out_norm
        shapes += [(ffn // tp, d), (ffn // tp, d), (d, ffn // tp)]
    if first:
        shapes.append((model_cfg.vocab_size, d))
    if last:
        shapes.append((d, 1))
        if not (first and model_cfg.tie_embeddings):
            shapes.append((model_cfg.vocab_size, d))
    return shapes


def sharded_numel(shapes, shards: int) -> int:
    """Elements on the rank holding the most: FSDP2 splits dim 0 into `shards` pieces of ceil(rows/shards)."""
    return sum(math.ceil(rows / shards) * cols for rows, cols in shapes)


def layer_saved_per_token(model_cfg, kind: str, part: str, *, p: int, a: int, autocast: bool, tp: int,
                          sp: bool, keys: float = 1.0, r: int | None = None) -> float:
    """Bytes one token leaves saved for backward in one layer's `part`: "attention" or "ffn" half.
    `keys`: K/V rows the softmax attention saves per local query (see `saved_keys`); `r`: bytes of
    a residual-stream element (`residual_bytes`; default `p`)."""
    r = p if r is None else r
    d, hd, ffn = model_cfg.d_model, head_dim(model_cfg), model_cfg.ffn_dim
    H, q, kv = model_cfg.n_heads, model_cfg.n_heads * hd, model_cfg.n_kv_heads * hd
    norm = (r * d + 4) / (tp if sp else 1)  # input + fp32 rstd; Megatron-SP keeps 1/tp of the tokens
    # the linears' (gathered) input: under autocast each linear saves its own bf16 cast of an fp32
    # input, but all of them share one bf16 input (a bf16 residual stream's norm output)
    inputs = lambda n: (a if r == a else n * a if autocast else p) * d
    if part == "ffn":
        return norm + inputs(2) + 4 * a * ffn / tp
    if kind == "S":
        return norm + inputs(3) + (a * (2 * q + 2 * kv * keys) + 4 * H) / tp
    return norm + inputs(4) + (9 * a * q + 4 * H) / tp


def saved_keys(par) -> float:
    """K/V rows per local token that softmax attention saves. Ring and Ulysses save their local
    (or head-sliced) K/V: 1. All-gather attention saves the key rows its queries see, in one buffer:
    the whole row on the busiest rank (zigzag: rank 0; contiguous: the last), cp local lengths."""
    if par.cp == 1 or par.softmax_sp != "allgather":
        return 1.0
    return float(par.cp)


def estimate(cfg, world: int, *, split: bool = True) -> MemoryEstimate:
    """The busiest rank's memory for `cfg` on `world` ranks (see the module docstring). `split`:
    count the split attention's cuDNN scratch (runs of code before the split did not allocate it)."""
    from seqpar.config import data_parallel_size
    from seqpar.parallel.pipeline import stage_layers

    m, par, t = cfg.model, cfg.parallel, cfg.train
    p, a, autocast = _dtype_bytes(cfg)
    r = residual_bytes(cfg)
    dp = data_parallel_size(cfg, world)
    tp, cp, pp = par.tp, par.cp, par.pp
    sp = tp > 1 and par.tp_sequence_parallel
    shards = dp * cp
    rows = t.micro_batch_size
    row_tokens = cfg.data.seq_len // cp
    tokens = rows * row_tokens
    n_micro = max(1, t.global_batch_size // (dp * t.micro_batch_size))
    stages = stage_layers(m, par, cfg.data.seq_len) if pp > 1 else [list(range(m.n_layers))]
    kinds = layer_types(m)
    mode = t.activation_checkpointing
    chunk = t.mlp_chunk_tokens if 0 < t.mlp_chunk_tokens < row_tokens else 0
    offload = t.offload_activations

    spdiv = tp if sp else 1
    per_token = lambda kind, part: layer_saved_per_token(m, kind, part, p=p, a=a, autocast=autocast, tp=tp, sp=sp,
                                                         keys=saved_keys(par), r=r)
    norm = (r * m.d_model + 4) / spdiv  # a norm's saved input and rstd
    block_input = r * m.d_model / spdiv * tokens  # what one checkpoint keeps
    # chunked, the MLP keeps only its input (the norm's output) and runs one chunk at a time
    ffn_inner = per_token("S", "ffn") - norm
    ffn_kept = norm + (r * m.d_model if chunk else ffn_inner)
    ffn_chunk = ffn_inner * rows * chunk

    def cast_weights(kind, part) -> float:
        """The bf16 copies of a layer part's weights its linears save for backward under autocast
        (each call casts the fp32 weight anew: there is no cast cache), held with its activations."""
        if not autocast:
            return 0.0
        d, hd = m.d_model, head_dim(m)
        q, kv = m.n_heads * hd, m.n_kv_heads * hd
        if part == "ffn":
            return a * 3 * m.ffn_dim * d / tp
        return a * ((2 * q + 2 * kv) * d if kind == "S" else 5 * q * d) / tp

    scratch = split_scratch(cfg) if split and "S" in kinds else 0

    def saved(kind) -> tuple[float, float, str]:
        """(kept per layer, transient while this layer runs its backward, what that transient is)."""
        kept, transient, what = _saved(kind)
        return (kept, transient + scratch, what + " + split attention's cuDNN scratch") if kind == "S" and scratch \
            else (kept, transient, what)

    def _saved(kind) -> tuple[float, float, str]:
        attention = per_token(kind, "attention")
        w_att, w_ffn = cast_weights(kind, "attention"), cast_weights(kind, "ffn")
        if mode == "none":  # a checkpointed MLP chunk casts its weights again when it recomputes
            return (attention + ffn_kept) * tokens + w_att + (0 if chunk else w_ffn), \
                ffn_chunk + (w_ffn if chunk else 0), "one MLP chunk"
        if mode == "full":
            return (0.0 if offload else block_input), (attention + ffn_kept) * tokens + ffn_chunk + w_att + w_ffn, \
                "one block's recompute"
        # selective: the two norms and the MLP are checkpoints that keep their inputs (block input,
        # residual after attention, ffn norm's output); the attention's own saved tensors stay
        kept = (attention - norm) * tokens + w_att + (0.0 if offload else 3 * block_input)
        return kept, ffn_kept * tokens + ffn_chunk + w_ffn, "one MLP's recompute"

    best = None
    for s, layers in enumerate(stages):
        first, last = s == 0, s == len(stages) - 1
        shapes = param_shapes(m, tp, layers=layers, first=first, last=last)
        n = sharded_numel(shapes, shards)
        in_flight = min(pp - s, n_micro) if pp > 1 else 1  # 1F1B: stage s holds pp - s micro-batches
        per_layer = {kind: int(saved(kind)[0]) for kind in set(kinds[i] for i in layers)}
        acts = in_flight * sum(saved(kinds[i])[0] for i in layers)
        transients = {what: amount for kind in per_layer for _, amount, what in [saved(kind)]}
        if last:
            # the final norm's input, the saved grad of the hidden states (fp32 chunk logits below)
            head_grad = p * m.vocab_size * m.d_model
            loss = (2 * r * m.d_model + 4) * tokens + head_grad
            transients["one cross-entropy chunk"] = min(tokens, CE_CHUNK) * m.vocab_size * (4 + a)
        else:
            loss = head_grad = 0
        if shards > 1:
            # FSDP2 gathers the root (embedding, output head) for the whole forward and two blocks at a
            # time (prefetch); the estimate keeps them unsharded on top of the largest transient
            block = max((sharded_numel(param_shapes(m, tp, layers=[i], first=False, last=False), 1)
                         for i in layers), default=0)
            root = sharded_numel([sh for sh in shapes if sh[0] == m.vocab_size], 1)
            fsdp = p * (root + 2 * block)
        else:
            fsdp = 0
        what, amount = max(transients.items(), key=lambda kv: kv[1])
        # the residual stream in flight: a block's input and output in forward; in backward the
        # gradients entering and leaving it and, checkpointed, its input brought back
        amount += 3 * block_input + _sp_buffers(cfg, tokens, a) + fsdp
        if fsdp:
            what += " + FSDP gathers"
        whole = sharded_numel(shapes, 1)
        held = [n if stage_sharded else whole for stage_sharded in _zero_sharding(par)]
        moments = 2 * p * held[2]
        # torch's foreach AdamW makes one temporary the size of the moments it updates (the square
        # root of exp_avg_sq): all of them at once, or one bucket of them when they stream from host
        temporaries = p * held[2]
        if t.offload_optimizer:  # in host memory; on the device, the moments of the buckets in flight
            moments = min(moments, OFFLOAD_BUCKETS_IN_FLIGHT * 2 * p * DEFAULT_BUCKET_NUMEL)
            temporaries = min(temporaries, p * DEFAULT_BUCKET_NUMEL)
        est = MemoryEstimate(params=p * held[0], grads=p * held[1], optimizer=moments,
                             optimizer_what="AdamW moments in flight from host" if t.offload_optimizer else "AdamW moments",
                             activations=int(acts), loss=int(loss), head_grad=int(head_grad),
                             transient=int(amount), transient_what=what, per_layer=per_layer, stage=s,
                             layers=len(layers), tokens=tokens, fixed=fixed_allocations(cfg),
                             step_temporaries=temporaries, optimizer_in_step_only=t.offload_optimizer,
                             accumulating=n_micro > 1)
        if best is None or est.total > best.total:
            best = est
    return best


def split_scratch(cfg) -> int:
    """What one softmax layer's long-document cuDNN calls may allocate on top (the split of packed
    rows, kernels/flash_attn/split.py): on CUDA, where attention sees whole documents (cp = 1, or
    Ulysses); the longest document taken as long as the row, up to the split's own bound. Rows
    of one document each (synthetic `fixed` documents at least a row long) are dense: no split."""
    from seqpar.config import use_cuda
    from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len, scratch_per_token

    m, par = cfg.model, cfg.parallel
    if not use_cuda(cfg) or (par.cp > 1 and par.softmax_sp != "ulysses") or _one_document_rows(cfg.data):
        return 0
    heads = m.n_heads // par.tp // (par.cp if par.cp > 1 else 1)
    _, a, _ = _dtype_bytes(cfg)
    longest = min(cfg.data.seq_len, max_doc_len(heads, head_dim(m), a))
    return longest * scratch_per_token(heads, head_dim(m), a) if longest >= min_doc_len(heads) else 0


def _one_document_rows(data) -> bool:
    """Whether every packed row holds a single document (the maxlen benchmark's rows): a packed
    row of one document is dense attention (kernels.dispatch.attention_case)."""
    return (data.name == "synthetic" and data.distribution == "fixed"
            and getattr(data, "mean_len", 1024) >= data.seq_len)


def _zero_sharding(par) -> tuple[bool, bool, bool]:
    """Whether parameters, gradients and optimizer states are sharded over dp x cp: FSDP2 shards
    all three (ZeRO-3's layout); DeepSpeed's ZeRO stage 1 only the optimizer, 2 also the gradients."""
    if getattr(par, "dp_engine", "fsdp2") != "deepspeed":
        return True, True, True
    stage = getattr(par, "zero_stage", None) or 2
    return stage >= 3, stage >= 2, True


def _sp_buffers(cfg, tokens: int, a: int) -> int:
    """The sequence-parallel method's extra buffers while one layer's attention runs."""
    m, par = cfg.model, cfg.parallel
    if par.cp == 1:
        return 0
    hd = head_dim(m)
    kv = m.n_kv_heads * hd // par.tp
    kinds = set(layer_types(m))
    out = 0
    if "S" in kinds:
        if par.softmax_sp == "allgather":
            out = max(out, 2 * kv * a * tokens * par.cp)  # the row's whole K and V
        else:
            out = max(out, 2 * 2 * kv * a * tokens)  # ring: the K/V block in use and the one arriving
    if "L" in kinds:
        states = m.n_heads // par.tp * hd * hd * 4  # one fp32 state per head
        out = max(out, states * par.cp * cfg.train.micro_batch_size)  # every rank's state, gathered
    return out


def knobs_that_fit(cfg, world: int, capacity: int) -> list[str]:
    """Overrides that bring the estimate under `capacity` (each on its own), with the total it gives;
    only those the config validation accepts (a tp that divides the heads, no MLP chunks under
    sequence-parallel TP, ...), so that every knob offered starts."""
    from seqpar.config import validate

    t, par = cfg.train, cfg.parallel
    tries = []
    if t.activation_checkpointing != "selective" and t.activation_checkpointing != "full":
        tries.append(({"train.activation_checkpointing": "selective"}, world))
    if t.activation_checkpointing != "full":
        tries.append(({"train.activation_checkpointing": "full"}, world))
    if not t.offload_activations:
        ac = t.activation_checkpointing if t.activation_checkpointing != "none" else "full"
        tries.append(({"train.activation_checkpointing": ac, "train.offload_activations": True}, world))
    if not t.offload_optimizer and par.dp_engine == "fsdp2":
        tries.append(({"train.offload_optimizer": True}, world))
    if not t.mlp_chunk_tokens and cfg.data.seq_len // par.cp > 8192:
        tries.append(({"train.mlp_chunk_tokens": 8192}, world))
    tries.append(({"parallel.cp": par.cp * 2}, world * 2))
    tries.append(({"parallel.tp": par.tp * 2}, world * 2))
    if par.dp != -1:
        tries.append(({"parallel.dp": 2 * par.dp}, world * 2))
    else:
        tries.append(({}, world * 2))  # dp=-1 grows with the world: more FSDP shards
    out = []
    for overrides, w in tries:
        c = copy.deepcopy(cfg)
        for key, value in overrides.items():
            section, name = key.split(".")
            setattr(getattr(c, section), name, value)
        try:
            validate(c, w)
            total = estimate(c, w).total
        except (ValueError, ZeroDivisionError):  # ConfigError is a ValueError
            continue
        if total <= capacity:
            what = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())
            what = what or "more data-parallel ranks (FSDP shards)"
            out.append(f"{what}{f' on {w} GPUs' if w != world else ''} -> {total / GiB:.1f} GiB")
    return out


def fit_error(cfg, world: int, est: MemoryEstimate, device_bytes: int) -> str | None:
    """The message for a run that will not fit in `device_bytes` per GPU, or None if it fits."""
    capacity = int(device_bytes * MARGIN)
    if est.total <= capacity:
        return None
    knobs = knobs_that_fit(cfg, world, capacity)
    advice = ("; it would fit with: " + "; ".join(knobs)) if knobs else \
        "; no single knob makes it fit: shorten data.seq_len or combine them"
    return (f"data.seq_len={cfg.data.seq_len} with train.activation_checkpointing={cfg.train.activation_checkpointing}, "
            f"parallel.cp={cfg.parallel.cp}, parallel.tp={cfg.parallel.tp}, parallel.dp={_dp(cfg, world)}: "
            f"predicted {est.total_gb:.1f} GiB per GPU (parameters {est.params / GiB:.1f}, gradients "
            f"{est.grads / GiB:.1f}, optimizer {est.optimizer / GiB:.1f}, activations {est.activations / GiB:.1f}, "
            f"loss {est.loss / GiB:.1f}, transient {est.transient / GiB:.1f}, fixed {est.fixed / GiB:.2f}) "
            f"exceeds {MARGIN:.0%} of the device's {device_bytes / GiB:.1f} GiB{advice} (SEQPAR_MEMORY_CHECK=0 starts it anyway)")


def _dp(cfg, world: int) -> int:
    from seqpar.config import data_parallel_size
    return data_parallel_size(cfg, world)


def check_before_start(cfg, world: int, device, rank: int) -> MemoryEstimate:
    """Rank 0 prints the estimate; on CUDA a run predicted not to fit stops here, before the first
    step (every rank computes the same estimate, so every rank stops)."""
    import torch

    from seqpar.config import ConfigError

    est = estimate(cfg, world)
    if rank == 0 and cfg.logging.console:
        print(est.table(), flush=True)
    # SEQPAR_MEMORY_CHECK=0: the maxlen benchmark measures the real limit, past the prediction
    if device.type == "cuda" and os.environ.get("SEQPAR_MEMORY_CHECK", "1") != "0":
        msg = fit_error(cfg, world, est, torch.cuda.get_device_properties(device).total_memory)
        if msg:
            raise ConfigError(msg)
    return est
