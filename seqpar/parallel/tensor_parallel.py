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

The embedding and the output head are split over the vocabulary (Megatron's vocab-parallel
layers): the embedding by rows, each rank looking up the ids it holds and the partial embeddings
summed (reduce-scattered along the sequence under SP); the head by rows too, its loss computed by
`vocab_parallel.vocab_parallel_cross_entropy` on the final hidden states, which every tp rank holds
whole. FSDP then shards both over dp x cp like every other tp shard.
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
    if model.tok_embeddings is not None:  # first pipeline stage
        # input ids whole on every rank; each rank's rows give a partial sum of the embedding
        parallelize_module(model.tok_embeddings, tp_mesh,
                           RowwiseParallel(input_layouts=Replicate(), output_layouts=stream))
    if model.output is not None:  # last pipeline stage
        # rows = vocabulary slices; never called as a module (the loss reads its weight), so only
        # the weight's sharding matters
        parallelize_module(model.output, tp_mesh, ColwiseParallel())
        if getattr(model, "tied", False):  # both were re-registered as DTensors: tie them again
            model.output.weight = model.tok_embeddings.weight
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
