"""Exact scans of linear-attention memory states along the chunks of a sequence, over the cp group.

Every chunk g of the global sequence contributes a state x_g (`[B, H, Dk, Dv]`) and carries the
state before it on with a per-head factor a_g (exp(log_decay * chunk_len), or 0 where a document
starts in the chunk). A scan hands each rank, for each chunk it holds, the exclusive prefix

    y_first = 0,   y_next(g) = a_g * y_g + x_g

taken in chunk order (forward: the state entering each chunk) or in reverse chunk order
(backward: the gradient of each chunk's own state, given the gradients of the entering states).
Both directions use the same a_g, so one scan serves the forward and its mirrored backward.

Scans are split in two: `start` posts the communication and returns at once, `wait()` finishes it
and returns y; the caller computes something useful (the intra-chunk attention) in between.

- ``allgather`` (LASP-2): one all-gather of every chunk's x, then each rank folds the prefix
  locally. One collective, latency of one hop, but each rank receives world x the state.
- ``pipelined`` (ZeCO's All-Scan): a chain in chunk order; each rank receives the running
  prefix from the holder of the previous chunk, adds its own and sends it on. The state is cut
  into blocks along Dv so that the next rank works on block j while block j+1 is in flight.
  Each rank moves about two states whatever the world size.
- ``ring`` (LASP-1): the same chain unblocked, one whole state per hop.

All states are exchanged and merged in fp32 (fp64 for fp64 inputs): the caller passes them so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from seqpar.parallel.sharding import group_size_rank

PIPELINE_BLOCKS = 4  # Dv=128 -> 32 columns, 0.5 MiB per message at H=32, Dk=128, fp32


@dataclass(frozen=True)
class ChunkChain:
    """Where each global chunk lives and how the state crosses it."""
    owners: list[tuple[int, int]]  # global chunk -> (rank in the cp group, its slot among that rank's chunks)
    carry: torch.Tensor  # [n_chunks, H]: a_g, the factor the state entering chunk g has when it leaves it
    rank: int
    # per global chunk, on the host: a document starts in it (a_g = 0) / its first token continues
    # the previous chunk's document
    starts: tuple[bool, ...]
    continues: tuple[bool, ...]
    _weights: dict = field(default_factory=dict, compare=False, repr=False)
    _receives: dict = field(default_factory=dict, compare=False, repr=False)

    def factor(self, g: int) -> torch.Tensor:
        return self.carry[g][:, None, None]

    def weights(self, reverse: bool) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """The fold of an all-gather: `(columns, index, w)` such that the prefix entering this rank's
        chunk i (`reverse`: the suffix) is `sum_j w[i, j] * gathered[columns[j]]`, the gathered states
        in the all-gather's (rank, slot) order (`index`: `columns` on the device); `w` is
        `[n_local, len(columns), 1, H, 1, 1]`, the product of the a_g crossed on the way. Only the
        columns that reach one of this rank's chunks without crossing a document start are kept (on
        2 ranks one or none): a multiply, not torch.einsum's contraction over every chunk, whose
        host time LASP-2 at 32k tokens per GPU cannot spare (bound by its host; the fold 214 -> 100
        us a call, 2 H100, 2026-11-28). Built once."""
        if reverse not in self._weights:
            n, n_local = len(self.owners), 1 + max(i for _, i in self.owners)
            w = {}  # (local chunk, column) -> factor [H]
            order = _order(n, reverse)
            for p, g in enumerate(order):
                r, i = self.owners[g]
                if r != self.rank:
                    continue
                crossed = torch.ones_like(self.carry[0])
                for before in reversed(order[:p]):
                    rb, ib = self.owners[before]
                    w[i, rb * n_local + ib] = crossed
                    if self.starts[before]:  # a_g = 0: nothing from further away reaches chunk g
                        break
                    crossed = crossed * self.carry[before]
            columns = sorted({c for _, c in w})
            dense = self.carry.new_zeros(n_local, len(columns), self.carry.shape[1])
            for (i, c), factor in w.items():
                dense[i, columns.index(c)] = factor
            index = torch.tensor(columns, dtype=torch.long).to(self.carry.device)
            self._weights[reverse] = (columns, index, dense[:, :, None, :, None, None])
        return self._weights[reverse]

    def receives(self, reverse: bool) -> bool:
        """Whether a nonzero state reaches any of this rank's chunks, decided on the host from where
        documents start: forward, a chunk that continues a document and has a chunk before it;
        backward (`reverse`), a later chunk that continues a document, reached without crossing a
        document start. The LASP exchange reads the inputs and results of the scan masked so
        (`lasp._ChunkExchange`): on 2 ranks, contiguous, rank 0 receives nothing in the forward
        and rank 1 nothing in the backward, so they need not wait for the collective."""
        if reverse not in self._receives:
            self._receives[reverse] = self._flows_in(reverse)
        return self._receives[reverse]

    def _flows_in(self, reverse: bool) -> bool:
        order = _order(len(self.owners), reverse)
        for p, g in enumerate(order):
            if self.owners[g][0] != self.rank:
                continue
            if not reverse and self.continues[g] and p > 0:
                return True
            if reverse:
                for before in reversed(order[:p]):  # outward from the next chunk
                    if self.continues[before]:
                        return True
                    if self.starts[before]:
                        break
        return False


def start_scan(method: str, x: torch.Tensor, chain: ChunkChain, group, *, reverse: bool = False):
    """Post the scan of this rank's chunk states `x` (`[n_local, B, H, Dk, Dv]`); `.wait()` -> y."""
    if method == "allgather":
        return _Gathered(x, chain, group, reverse)
    if method == "pipelined":
        return _Chained(x, chain, group, reverse, blocks=PIPELINE_BLOCKS)
    if method == "ring":
        return _Chained(x, chain, group, reverse, blocks=1)
    raise ValueError(f"unknown state scan {method!r}; choose one of {SCANS} (lasp1 uses 'ring')")


SCANS = ("allgather", "pipelined")  # selectable as parallel.linear_scan


def _order(n: int, reverse: bool) -> list[int]:
    return list(range(n - 1, -1, -1)) if reverse else list(range(n))


class _Gathered:
    def __init__(self, x, chain, group, reverse):
        self.chain, self.reverse = chain, reverse
        world, _ = group_size_rank(group)
        self.work = None
        if world == 1:
            self.parts = x[None]
        else:
            self.parts = x.new_empty((world * x.shape[0], *x.shape[1:]))
            # torch 2.13 renamed all_gather_into_tensor; the GPU machine's 2.11 has only the old name
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            self.work = gather(self.parts, x.contiguous(), group=group, async_op=True)
            self.parts = self.parts.unflatten(0, (world, x.shape[0]))

    def wait(self) -> torch.Tensor:
        self.settle()
        columns, index, w = self.chain.weights(self.reverse)
        parts = self.parts.flatten(0, 1)
        if not columns:
            return parts.new_zeros(w.shape[0], *parts.shape[1:])
        if len(columns) == 1:
            return w[:, 0] * parts[columns[0]]
        return (w * parts.index_select(0, index)).sum(1)

    def settle(self) -> None:
        """The collective done, its result unread: the compute stream waits for it from here on
        (its buffers outlive the transfer) without a fold."""
        if self.work is not None:
            self.work.wait()
            self.work = None


class _Chained:
    """The chain runs as a generator: `start` advances it to its first receive; `wait` finishes it."""

    def __init__(self, x, chain, group, reverse, blocks):
        self.y = torch.empty_like(x)
        self.sends = []  # (work, tensor): a sent buffer must outlive its send
        self.group = group
        cols = x.shape[-1]
        step = -(-cols // min(blocks, cols))
        self.blocks = [slice(a, min(a + step, cols)) for a in range(0, cols, step)]
        self._steps = self._run(x, chain, reverse)
        next(self._steps, None)

    def wait(self) -> torch.Tensor:
        for _ in self._steps:
            pass
        for work, _ in self.sends:
            work.wait()
        self.sends.clear()
        return self.y

    def settle(self) -> None:
        """The chain finished (the next ranks need what this one sends on), its result unread."""
        self.wait()

    def _run(self, x, chain, reverse):
        order = _order(len(chain.owners), reverse)
        owner = [chain.owners[g][0] for g in order]
        local = None  # the prefix entering the current chunk when the previous chunk is ours too
        for p, g in enumerate(order):
            if owner[p] != chain.rank:
                continue
            i = chain.owners[g][1]
            if p == 0:
                incoming, works = [x.new_zeros(x[i][..., b].shape) for b in self.blocks], None
            elif owner[p - 1] == chain.rank:
                incoming, works = local, None
            else:
                incoming = [x.new_empty(x[i][..., b].shape) for b in self.blocks]
                # the same tag per block keeps the messages of one hop matched in order on gloo
                works = [dist.irecv(buf, group=self.group, group_src=owner[p - 1], tag=j)
                         for j, buf in enumerate(incoming)]
                yield
            nxt = owner[p + 1] if p + 1 < len(order) else None
            outgoing = []
            for j, b in enumerate(self.blocks):
                if works is not None:
                    works[j].wait()
                self.y[i][..., b] = incoming[j]
                if nxt is None:
                    continue
                out = chain.factor(g) * incoming[j] + x[i][..., b]
                if nxt == chain.rank:
                    outgoing.append(out)
                else:
                    self.sends.append((dist.isend(out, group=self.group, group_dst=nxt, tag=j), out))
            local = outgoing
