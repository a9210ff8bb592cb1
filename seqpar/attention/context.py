"""What a model's attention call needs to know about the step, built once per step.

The model knows nothing of ranks: it calls `softmax_attention(q, k, v, ctx)` or
`linear_attention(q, k, v, log_decay, ctx)` and the sequence-parallel method named in `ctx`
does the rest (torchtitan's "CP is a context around the step, not a wrapper class").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class AttnContext:
    group: dist.ProcessGroup | None = None  # the cp group; None or size 1 = no sequence parallelism
    cu_seqlens: torch.Tensor | None = None  # GLOBAL document boundaries of the packed B=1 row (int32)
    position_ids: torch.Tensor | None = None  # [S_local] position of each local token inside its document
    layout: str = "zigzag"  # how shard_sequence cut the row: contiguous | zigzag | doc_zigzag | doc_balanced
    softmax_sp: str = "allgather"  # allgather | ring | ulysses | usp | disagg
    linear_sp: str = "lasp2"  # lasp2 | lasp1
    linear_scan: str = "allgather"  # lasp2's state exchange: allgather | pipelined
    # what softmax layers see instead, when it differs: with parallel.disagg.group=dp_cp, the dp_cp
    # group, the dp ranks' rows joined (disagg.join_row_bounds) and layout contiguous (the dp rows,
    # each cut in cp contiguous pieces, are the shards of one row); linear layers keep the cp group
    softmax_view: "AttnContext | None" = None

    def for_softmax(self) -> "AttnContext":
        return self.softmax_view or self

    @property
    def cp_size(self) -> int:
        return 1 if self.group is None else dist.get_world_size(self.group)
