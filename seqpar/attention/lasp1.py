"""LASP-1 (Sun et al., 2024): linear attention over the cp group by a sequential P2P chain of states.

Each rank waits for the state entering its chunk from the holder of the previous chunk, folds in
its own chunk and passes it on, in chunk order (with `zigzag`: out along ranks 0..N-1 and back);
the backward passes state gradients the other way. The hops sit on the critical path and nothing
overlaps them, which is what LASP-2's single overlapped collective removes. Kept for comparison
(`parallel.linear_sp=lasp1`, `python -m seqpar.bench lasp`) and as a second exact implementation
for the tests; it shares LASP-2's Function and differs only in the scan and the schedule.
"""
from __future__ import annotations

from seqpar.attention.lasp import lasp_attention


def lasp1_attention(q, k, v, *, log_decay, group=None, cu_seqlens=None, scale=None, layout="contiguous"):
    return lasp_attention(q, k, v, log_decay, group=group, cu_seqlens=cu_seqlens, scale=scale, layout=layout,
                          scan="ring", overlap=False)
