"""Apply parallelism to a plain model, always in the same order (torchtitan's rule):
tensor parallelism -> activation checkpointing -> data-parallel sharding (FSDP2)."""
from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import fully_shard

from seqpar.parallel.dims import ParallelDims
from seqpar.parallel.tensor_parallel import apply_tensor_parallel


def parallelize(model: torch.nn.Module, dims: ParallelDims, cfg) -> torch.nn.Module:
    """`cfg`: the job config (its `parallel` and `train` sections)."""
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh["tp"], sequence_parallel=cfg.parallel.tp_sequence_parallel)
    if cfg.train.activation_checkpointing == "full":
        for name, block in model.layers.items():
            model.layers[name] = checkpoint_wrapper(block)
    if gradient_replicas(dims) > 1:
        # cp ranks hold the same parameters but different tokens: they shard and reduce like dp ranks
        mesh = dims.mesh["dp_cp"]
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def gradient_replicas(dims: ParallelDims) -> int:
    """How many ranks FSDP averages each gradient over (the loss is scaled to undo the mean)."""
    return dims.dp * dims.cp
