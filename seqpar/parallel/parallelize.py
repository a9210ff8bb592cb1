"""Apply parallelism to a plain model, always in the same order (torchtitan's rule):
tensor parallelism -> activation checkpointing -> data-parallel sharding (FSDP2)."""
from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import checkpoint
from torch.distributed.fsdp import fully_shard

from seqpar.parallel.dims import ParallelDims
from seqpar.parallel.offload import ActivationOffloader
from seqpar.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg) -> torch.nn.Module:
    """`cfg`: the job config (its `parallel` and `train` sections)."""
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh["tp"], sequence_parallel=cfg.parallel.tp_sequence_parallel)
    apply_activation_checkpointing(model, cfg.train)
    if gradient_replicas(dims) > 1 and cfg.parallel.dp_engine == "fsdp2":  # else DeepSpeed wraps it (engine.py)
        # cp ranks hold the same parameters but different tokens: they shard and reduce like dp ranks
        mesh = dims.mesh["dp_cp"]
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def apply_activation_checkpointing(model: torch.nn.Module, train_cfg) -> None:
    """`full`: each block keeps only its input and recomputes the rest in backward. `selective`:
    each block keeps its attention half's saved tensors (the attention output and its LSE or
    states: quadratic or cross-rank work to recompute) and recomputes its norms and MLP (cheap
    matmuls, but the MLP's `[S, ffn_dim]` intermediates are the largest activations of a block).
    `offload_activations`: what a checkpoint keeps (its input) waits for backward in CPU memory."""
    mode = train_cfg.activation_checkpointing
    offloader = ActivationOffloader() if train_cfg.offload_activations and mode != "none" else None
    wrap = lambda module, **kw: checkpoint_wrapper(
        module, checkpoint_fn=offloader.checkpoint if offloader else checkpoint, use_reentrant=False, **kw)
    for name, block in model.layers.items():
        block.feed_forward.chunk_tokens = train_cfg.mlp_chunk_tokens
        if mode == "full":
            model.layers[name] = wrap(block)
        elif mode == "selective":
            # norm and MLP are checkpointed one by one (the block's forward stays the model's own):
            # each keeps its input, one [S, d] more than a joint checkpoint would
            # early_stop=False: a norm's recompute is one custom autograd Function (the Triton
            # RMSNorm), and checkpoint's early stop, an exception raised from the pack hook inside
            # that Function's save, came out of torch 2.11's Function.apply as "SystemError:
            # returned NULL without setting an exception" (H100, llama_1b 96k/128k, 2026-11-26)
            for part in ("attention_norm", "ffn_norm", "feed_forward"):
                setattr(block, part, wrap(getattr(block, part), early_stop=False))
        if offloader:  # on the outermost module of the block: its checkpoints are done when it returns
            model.layers[name].register_forward_hook(offloader.release)


def gradient_replicas(dims: ParallelDims) -> int:
    """How many ranks FSDP or DeepSpeed averages each gradient over (the loss is scaled to undo the mean)."""
    return dims.dp * dims.cp
