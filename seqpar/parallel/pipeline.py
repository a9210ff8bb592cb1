"""Pipeline parallelism: the layer stack cut into `pp` stages, run with the 1F1B schedule.

The schedule is seqpar's own rather than torch.distributed.pipelining's: every micro-batch is a
packed row with its own document boundaries, and the attention of every stage needs them (the
`AttnContext`). torch's schedules split one batch tensor along dim 0 into micro-batches and pass
the same extra arguments to all of them; here each stage simply builds the micro-batch's context
itself from the batch every rank loaded, and only activations travel between stages.

Stages are balanced on a cost model that counts each layer's matmuls plus its attention:
quadratic in document length for softmax layers, linear for lightning layers, so a hybrid model's
softmax layers weigh more; the output head counts towards the last stage.

With `parallel.virtual_stages=V` > 1 the stack is cut into pp x V stages and rank r holds stages
r, r + pp, ... (Megatron-LM's interleaved schedule): the warm-up bubble shrinks V-fold, for V times
as many point-to-point messages.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from seqpar.model.flops import layer_flops


def split_layers(costs: list[float], pp: int, last_extra: float = 0.0) -> list[list[int]]:
    """Contiguous layer ranges, one per stage, minimising the largest stage cost (exact DP).

    `last_extra` is work the last stage does besides its layers (the output head and loss)."""
    n = len(costs)
    if not 1 <= pp <= n:
        raise ValueError(f"cannot cut {n} layers into {pp} pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest max-cost of the first i layers in s stages; cut[s][i]: where stage s starts
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    cut = [[0] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, n + 1):
            for j in range(s - 1, i):
                stage = prefix[i] - prefix[j] + (last_extra if s == pp and i == n else 0.0)
                value = max(best[s - 1][j], stage)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    ranges, i = [], n
    for s in range(pp, 0, -1):
        ranges.append(list(range(cut[s][i], i)))
        i = cut[s][i]
    return ranges[::-1]


def stage_layers(model_cfg, parallel_cfg, seq_len: int) -> list[list[int]]:
    """Each pp rank's layer indices (all its virtual stages together)."""
    return [[i for chunk in chunks for i in chunk] for chunks in virtual_stage_layers(model_cfg, parallel_cfg, seq_len)]


def virtual_stage_layers(model_cfg, parallel_cfg, seq_len: int) -> list[list[list[int]]]:
    """[pp rank][virtual stage] -> layer indices. The layer stack is cut into pp x V contiguous
    stages (`parallel.pp_layers` if given, else balanced on the cost model for one document of
    `seq_len` tokens: the quadratic worst case); rank r holds stages r, r + pp, r + 2 pp, ...
    (Megatron's interleaving), so a micro-batch visits every rank V times."""
    pp, v = parallel_cfg.pp, getattr(parallel_cfg, "virtual_stages", 1) or 1
    if parallel_cfg.pp_layers:
        bounds = [0]
        for n in parallel_cfg.pp_layers:
            bounds.append(bounds[-1] + n)
        stages = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    else:
        head = 6.0 * model_cfg.vocab_size * model_cfg.d_model * seq_len
        stages = split_layers(layer_flops(model_cfg, [seq_len]), pp * v, last_extra=head)
    return [[stages[chunk * pp + rank] for chunk in range(v)] for rank in range(pp)]


def pipeline_stage(model, dims, cfg):
    """This rank's stage of a full, unmaterialised `Transformer` (the model itself when pp=1)."""
    if dims.pp == 1:
        return model
    rank = dims.rank_in("pp")
    chunks = virtual_stage_layers(cfg.model, cfg.parallel, cfg.data.seq_len)[rank]
    return keep_stage(model, chunks, first=rank == 0, last=rank == dims.pp - 1)


def keep_stage(model, chunks: list[list[int]], first: bool, last: bool):
    """Drop from a full `Transformer` what this rank does not run (before parallelising it);
    `chunks`: its virtual stages' layer indices (one list without interleaving)."""
    keep = {str(i) for chunk in chunks for i in chunk}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    model.chunks = [[str(i) for i in chunk] for chunk in chunks]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


class OneFOneB:
    """1F1B (PipeDream-Flush): stage r runs pp-r-1 warm-up forwards, then alternates one forward
    and one backward, then drains the remaining backwards; at most pp micro-batches' activations
    are alive per stage. Activations and their gradients move with paired non-blocking P2P, so two
    neighbours sending to each other at once cannot deadlock."""

    def __init__(self, group, activation_shape, dtype, device, backward=torch.autograd.backward):
        self.group, self.backward = group, backward  # backward(output, grad): the dp engine's
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.prev = dist.get_global_rank(group, self.rank - 1) if self.rank > 0 else None
        self.next = dist.get_global_rank(group, self.rank + 1) if self.rank < self.size - 1 else None
        self.shape, self.dtype, self.device = activation_shape, dtype, device

    def run(self, forward, n_micro: int) -> None:
        """`forward(i, x)`: this stage on micro-batch i, `x` the received activations (None on the
        first stage); on the last stage it returns the scaled loss to backpropagate."""
        warmup = min(self.size - self.rank - 1, n_micro)
        alive = deque()  # (input, output) of micro-batches forwarded and not yet backpropagated
        for i in range(warmup):
            x = _input(self._recv(self.prev))
            y = forward(i, x)
            self._exchange(send=(y, self.next))
            alive.append((x, y))
        x = _input(self._recv(self.prev)) if warmup < n_micro else None
        for i in range(warmup, n_micro):
            y = forward(i, x)
            alive.append((x, y))
            dy, = self._exchange(send=(y, self.next), recv=self.next)
            dx = self._backward(*alive.popleft(), dy)
            if i == n_micro - 1:
                self._exchange(send=(dx, self.prev))
            else:
                x = _input(self._exchange(send=(dx, self.prev), recv=self.prev)[0])
        while alive:
            dy = self._recv(self.next)
            self._exchange(send=(self._backward(*alive.popleft(), dy), self.prev))

    def _backward(self, x, y, dy):
        self.backward(y, dy)  # dy None on the last stage: y is the loss
        return None if x is None else x.grad

    def _recv(self, peer):
        return self._exchange(recv=peer)[0]

    def _exchange(self, send=(None, None), recv=None):
        """Post one send and one receive together; returns [received tensor or None]."""
        tensor, dst = send
        ops, buf = [], None
        if dst is not None:
            ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), dst, self.group))
        if recv is not None:
            buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, buf, recv, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return [buf]


def _input(x):
    """Received activations become a leaf whose .grad is what the stage sends back."""
    return None if x is None else x.requires_grad_()


# One communication round of the interleaved schedule: compute, then one batched exchange with
# the ring neighbours. `forward`/`backward`: virtual micro-batch indices (None: none this round);
# `send_next`/`send_prev`: whether the round's output activation / input gradient leaves;
# `recv_prev`/`recv_next`: the chunk whose input activation / output gradient arrives (None: none).
Round = tuple  # (forward, backward, send_next, send_prev, recv_prev, recv_next)


def interleaved_rounds(pp: int, virtual: int, n_micro: int, rank: int) -> list[Round]:
    """Megatron-LM's interleaved 1F1B for pipeline rank `rank`, as a list of rounds.

    Virtual micro-batch k (0 <= k < n_micro * virtual) is micro-batch `interleaved_micro(k)` on
    chunk `interleaved_chunk(k)` (reversed in backward): groups of pp micro-batches go through
    chunk 0, then the same group through chunk 1, ... Warm-up holds 2 (pp - rank - 1) +
    (virtual - 1) pp forwards, so each rank keeps about pp x virtual micro-batch-chunks in flight
    and the bubble shrinks by `virtual` against plain 1F1B. The sends and receives of neighbouring
    ranks pair up round by round (tests/test_pipeline.py replays the exchange)."""
    if n_micro % pp:
        raise ValueError(f"interleaved pipeline: {n_micro} micro-batches are not a multiple of pp={pp}")
    total = n_micro * virtual
    chunk = lambda k, forward=True: interleaved_chunk(k, pp, virtual, forward)
    first, last = rank == 0, rank == pp - 1
    sends_output = lambda k: not (last and chunk(k) == virtual - 1)  # the last stage's output is the loss
    sends_grad = lambda k: not (first and chunk(k, False) == 0)  # the first stage's input is the batch
    all_warmup = n_micro == pp
    warmup = total if all_warmup else min(total, 2 * (pp - rank - 1) + (virtual - 1) * pp)
    steady = total - warmup
    rounds = [] if first else [(None, None, False, False, 0, None)]
    for k in range(warmup):
        nxt = chunk(k + 1)
        recv_prev = nxt if not (first and nxt == 0) and k != total - 1 else None
        recv_next = virtual - 1 if k == warmup - 1 and not all_warmup and not last else None
        rounds.append((k, None, sends_output(k), False, recv_prev, recv_next))
    for k in range(steady):
        fk, bk = k + warmup, k
        if first:  # rank 0's next forward input comes round the ring from rank pp-1's previous chunk
            c = chunk(fk - (pp - 1))
            recv_prev = c + 1 if c != virtual - 1 else None
        else:
            recv_prev = chunk(fk + 1)
        if last:
            c = chunk(bk - (pp - 1), False)
            recv_next = c - 1 if c != 0 else None
        else:
            recv_next = chunk(bk + 1, False)
        if k == steady - 1:
            recv_prev = None
        rounds.append((fk, bk, sends_output(fk), sends_grad(bk), recv_prev, recv_next))
    if all_warmup and not last:
        rounds.append((None, None, False, False, None, virtual - 1))
    for k in range(steady, total):
        nxt = chunk(k + 1, False)
        recv_next = None if (last and nxt == virtual - 1) or k == total - 1 else nxt
        rounds.append((None, k, False, sends_grad(k), None, recv_next))
    return rounds


def interleaved_chunk(k: int, pp: int, virtual: int, forward: bool = True) -> int:
    c = (k % (pp * virtual)) // pp
    return c if forward else virtual - 1 - c


def interleaved_micro(k: int, pp: int, virtual: int) -> int:
    return (k // (pp * virtual)) * pp + k % pp


class InterleavedOneFOneB(OneFOneB):
    """Interleaved 1F1B over `virtual` chunks per rank (`interleaved_rounds`). Ranks form a ring:
    chunk c's output on the last rank goes to chunk c + 1 on the first. Each round's sends and
    receives go out in one batch, activations before gradients, so that with pp=2, where both
    neighbours are the same rank, the two streams still pair up in order."""

    def __init__(self, group, activation_shape, dtype, device, backward=torch.autograd.backward, *, virtual: int):
        super().__init__(group, activation_shape, dtype, device, backward)
        self.virtual = virtual
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)

    def run(self, forward, n_micro: int) -> None:
        """`forward(i, x, chunk)`: chunk `chunk` of this rank on micro-batch i (x None on the very
        first stage); on the very last stage it returns the scaled loss to backpropagate."""
        pp, v = self.size, self.virtual
        inputs = [deque() for _ in range(v)]  # received, not yet forwarded
        alive = [deque() for _ in range(v)]  # forwarded, not yet backpropagated: (input, output)
        grads = [deque() for _ in range(v)]  # received output gradients, not yet used
        for fk, bk, send_next, send_prev, recv_prev, recv_next in interleaved_rounds(pp, v, n_micro, self.rank):
            y = dx = None
            if fk is not None:
                c = interleaved_chunk(fk, pp, v)
                x = None if self.rank == 0 and c == 0 else inputs[c].popleft()
                y = forward(interleaved_micro(fk, pp, v), x, c)
                alive[c].append((x, y))
            if bk is not None:
                c = interleaved_chunk(bk, pp, v, forward=False)
                dy = None if self.rank == pp - 1 and c == v - 1 else grads[c].popleft()
                dx = self._backward(*alive[c].popleft(), dy)
            got_x, got_dy = self._round(y if send_next else None, dx if send_prev else None,
                                        recv_prev is not None, recv_next is not None)
            if recv_prev is not None:
                inputs[recv_prev].append(_input(got_x))
            if recv_next is not None:
                grads[recv_next].append(got_dy)

    def _round(self, y, dx, recv_x: bool, recv_dy: bool):
        ops, got = [], [None, None]
        if y is not None:
            ops.append(dist.P2POp(dist.isend, y.detach().contiguous(), self.next, self.group))
        if recv_x:
            got[0] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, got[0], self.prev, self.group))
        if dx is not None:
            ops.append(dist.P2POp(dist.isend, dx.contiguous(), self.prev, self.group))
        if recv_dy:
            got[1] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, got[1], self.next, self.group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return got
