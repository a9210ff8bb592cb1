"""Disaggregation across data-parallel ranks (`parallel.disagg.group=dp_cp`).

Under pure data parallelism every rank holds whole packed rows of its own documents, so the
ranks' attention work differs by the sum of their squared document lengths and the step waits
for the slowest. Laid end to end in rank order, the ranks' rows form one virtual packed row whose
`contiguous` shards are exactly the rows the ranks already hold, and in which no document crosses
a rank boundary. `join_row_bounds` gives that row's document boundaries; `disagg_attention` over
the group with them and `layout="contiguous"` then plans over all ranks' documents, so a rank's
tasks may be served by any rank, and its mirrored backward returns each rank the gradients of its
own rows only (attention has no parameters: nothing else crosses ranks). Every rank gathers the
same boundaries, so every rank computes the same plan.

With cp > 1 the rows are joined over the dp group (every cp rank of a row holds its global
boundaries) and each row is cut in cp `contiguous` pieces: dp_cp ranks are numbered dp-major
(ParallelDims flattens (dp, cp)), so rank d*cp + c holds piece d*cp + c of the joined row, which
again makes the ranks' shards the `contiguous` shards of one row over dp_cp. Other layouts cut a
row into pieces that are not contiguous in the joined row: not supported.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.parallel.sharding import group_size_rank

GROUPS = ("cp", "dp_cp")


def join_row_bounds(cu_seqlens: torch.Tensor, group=None) -> torch.Tensor:
    """The group's rows joined in rank order: int32 boundaries of the virtual row (on
    `cu_seqlens`' device), from this rank's LOCAL `cu_seqlens` of its packed row. A collective:
    every rank of `group` calls it. The rows must have equal lengths (they are the contiguous
    shards of the virtual row)."""
    world, _ = group_size_rank(group)
    local = cu_seqlens.to(torch.int64).reshape(-1)
    if world == 1:
        return local.to(torch.int32)
    # ranks hold different document counts: gather the counts, then the bounds padded to the longest
    count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in torch.cat(counts).tolist()]
    padded = local.new_zeros(max(counts))
    padded[:local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rows = [p[:n].tolist() for p, n in zip(torch.stack(parts).cpu(), counts)]
    lengths = [row[-1] - row[0] if row else 0 for row in rows]
    if any(len(row) < 2 or row[0] != 0 for row in rows) or len(set(lengths)) != 1:
        raise ValueError(f"disaggregation over the data-parallel group joins the ranks' packed rows into one row: "
                         f"every rank needs cu_seqlens from 0 to the same row length; the rows end at {lengths}")
    joined = [0]
    for r, row in enumerate(rows):
        joined += [r * lengths[0] + b for b in row[1:]]
    return torch.tensor(joined, dtype=torch.int32, device=cu_seqlens.device)


def joins_dp_rows(parallel, dp: int) -> bool:
    """Whether softmax layers see the dp ranks' rows joined (`parallel.disagg.group=dp_cp` with
    disagg attention and more than one data-parallel rank; elsewhere dp_cp is the cp group)."""
    return parallel.disagg.group == "dp_cp" and parallel.softmax_sp == "disagg" and dp > 1


def check_group(parallel, micro_batch_size: int, dp: int) -> None:
    """`parallel.disagg.group=dp_cp` against the rest of the config (ValueError names the keys)."""
    if not joins_dp_rows(parallel, dp):  # the group's value is checked by options.validate
        return
    if parallel.cp != 1 and parallel.layout != "contiguous":
        raise ValueError(f"parallel.disagg.group=dp_cp with parallel.cp={parallel.cp} needs parallel.layout=contiguous "
                         f"(now {parallel.layout}): the dp rows, each cut in cp contiguous pieces, are then the shards "
                         "of one row over dp x cp; or set parallel.cp=1, or parallel.disagg.group=cp")
    if micro_batch_size != 1:
        raise ValueError(f"parallel.disagg.group=dp_cp needs train.micro_batch_size=1 (now {micro_batch_size}): "
                         "each rank's micro-batch is one packed row of the joined row")
