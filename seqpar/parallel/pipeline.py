"""Pipeline parallelism: the layer stack cut into `pp` stages, run with the 1F1B schedule.

The schedule is seqpar's own rather than torch.distributed.pipelining's: every micro-batch is a
packed row with its own document boundaries, and the attention of every stage needs them (the
`AttnContext`). torch's schedules split one batch tensor along dim 0 into micro-batches and pass
the same extra arguments to all of them; here each stage simply builds the micro-batch's context
itself from the batch every rank loaded, and only activations travel between stages.

Stages are balanced on a cost model that counts each layer's matmuls plus its attention:
quadratic in document length for softmax layers, linear for lightning layers, so a hybrid model's
softmax layers weigh more; the output head counts towards the last stage.
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
    """Each stage's layer indices: `parallel.pp_layers` if given, else balanced on the cost model
    (one document of `seq_len` tokens: the quadratic worst case)."""
    pp = parallel_cfg.pp
    if parallel_cfg.pp_layers:
        bounds = [0]
        for n in parallel_cfg.pp_layers:
            bounds.append(bounds[-1] + n)
        return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    head = 6.0 * model_cfg.vocab_size * model_cfg.d_model * seq_len
    return split_layers(layer_flops(model_cfg, [seq_len]), pp, last_extra=head)


def pipeline_stage(model, dims, cfg):
    """This rank's stage of a full, unmaterialised `Transformer` (the model itself when pp=1)."""
    if dims.pp == 1:
        return model
    stage = dims.rank_in("pp")
    layers = stage_layers(cfg.model, cfg.parallel, cfg.data.seq_len)[stage]
    return keep_stage(model, layers, first=stage == 0, last=stage == dims.pp - 1)


def keep_stage(model, layers: list[int], first: bool, last: bool):
    """Drop from a full `Transformer` what this stage does not run (before parallelising it)."""
    for name in list(model.layers.keys()):
        if int(name) not in layers:
            del model.layers[name]
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

    def __init__(self, group, activation_shape, dtype, device):
        self.group = group
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
        torch.autograd.backward(y, dy)  # dy None on the last stage: y is the loss
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
