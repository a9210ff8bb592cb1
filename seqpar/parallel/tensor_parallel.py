"""Tensor parallelism of the seqpar decoder through DTensor (torchtitan's plan, Megatron's math).

Per block: q/k/v (and the linear layers' gate) column-parallel over heads, the out projection
row-parallel; SwiGLU's w1/w3 column-, w2 row-parallel. So each tp rank runs attention on its own
heads and the only collectives are the ones at the block's two ends. With
`parallel.tp_sequence_parallel=true` (Megatron-SP) the residual stream between them stays split
along the sequence: norms run on 1/tp of the tokens, and the all-reduce of the row-parallel
output becomes a reduce-scatter + an all-gather at the next block's input.

Why DTensor rather than megatron-core's layers: it shards the same `nn.Linear`s the model already
has, composes with FSDP2 on the same DeviceMesh (FSDP then shards the tp shards over dp x cp), and
takes its groups from ParallelDims; megatron-core's layers bring their own modules and state.

The embedding and the output head stay whole on every tp rank (FSDP still shards them over
dp x cp): every tp rank computes the same loss from the same full hidden states, so their
gradients agree without a tp reduction. A vocabulary-parallel loss would split that work too.
"""
from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from seqpar.model.layers import LinearAttention


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (a seqpar Transformer) in place over `tp_mesh`."""
    tp = tp_mesh.size()
    # the residual stream between blocks: split along the sequence (SP) or whole on every rank
    stream = Shard(1) if sequence_parallel else Replicate()
    if sequence_parallel and model.tok_embeddings is not None:  # first pipeline stage
        # each rank keeps its slice of the sequence; backward all-gathers the embedding's gradient
        parallelize_module(model.tok_embeddings, tp_mesh,
                           PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1)))
    if sequence_parallel and model.norm is not None:  # last pipeline stage
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
        # the loss needs every token's hidden state: gather after the final norm
        parallelize_module(model.norm, tp_mesh, PrepareModuleOutput(output_layouts=Shard(1),
                                                                    desired_output_layouts=Replicate()))
    for block in model.layers.values():
        attn = block.attention
        plan = {
            "attention": PrepareModuleInput(input_layouts=(stream, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=stream),
            "feed_forward": PrepareModuleInput(input_layouts=(stream,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=stream),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        if isinstance(attn, LinearAttention):
            plan["attention.wg"] = ColwiseParallel()
            # one gain shared by all heads, each rank seeing its own heads: treat the head dim as
            # sharded, so the gain's gradient is summed over tp ranks
            plan["attention.out_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            attn.shard_heads(tp_mesh.get_local_rank(), tp)
        parallelize_module(block, tp_mesh, plan)
