"""Deterministic batches of packed windows for one data-parallel rank.

Sample order is one stream of window indices: epoch e is the permutation drawn from
default_rng((seed, e)), epochs follow each other without a seam, and global step s takes stream
positions [s*G, (s+1)*G). It depends on (seed, G, dataset) only, so dp ranks agree without
talking and a run resumed with another dp size continues on the same samples."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class MicroBatch:
    """Micro-batch sequences laid end to end in one packed row (B = 1)."""
    input_ids: torch.Tensor  # [1, mbs * seq_len] int64
    targets: torch.Tensor  # [1, mbs * seq_len] int64, IGNORE_INDEX where no target
    cu_seqlens: torch.Tensor  # [n_docs + 1] int32, document boundaries over the row


class PackedLoader:
    def __init__(self, dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, read_as_rank: int | None = None):
        if global_batch_size < 1 or micro_batch_size < 1 or global_batch_size % (dp_size * micro_batch_size):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} must be a positive multiple of "
                f"train.micro_batch_size={micro_batch_size} times the data-parallel size dp={dp_size} "
                f"(= {dp_size * micro_batch_size})")
        for name, r in (("dp_rank", dp_rank), ("read_as_rank", read_as_rank)):
            if r is not None and not 0 <= r < dp_size:
                raise ValueError(f"{name}={r} out of range for dp size {dp_size}")
        if len(dataset) < global_batch_size:
            seq_len = getattr(dataset, "seq_len", "?")
            raise ValueError(
                f"the dataset holds {len(dataset)} sequences of data.seq_len={seq_len}, fewer than one global batch "
                f"(train.global_batch_size={global_batch_size}); use more data, a shorter data.seq_len or a smaller "
                "train.global_batch_size")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.read_as_rank = read_as_rank  # every rank reads this rank's micro-batches (benchmarks' balanced ideal)
        self.seed = seed
        self.consumed = 0  # global batches taken so far
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # a batch spans at most two epochs; older permutations are never asked for again
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(len(self.dataset))
        return self._perms[epoch]

    def global_indices(self, step: int) -> np.ndarray:
        """Window indices of global batch `step` (0-based), for every dp rank."""
        n, G = len(self.dataset), self.global_batch_size
        positions = np.arange(step * G, (step + 1) * G)
        epochs = positions // n
        return np.concatenate([self._permutation(int(e))[positions[epochs == e] % n] for e in np.unique(epochs)])

    def next_batch(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next optimizer step."""
        batch = self.peek()
        self.consumed += 1
        return batch

    def peek(self, dp_rank: int | None = None) -> list[MicroBatch]:
        """The micro-batches that dp rank `dp_rank` (default: this one) takes at its next
        `next_batch`, without taking them."""
        read = self.dp_rank if dp_rank is None else dp_rank
        read = read if self.read_as_rank is None else self.read_as_rank
        per_rank = self.global_batch_size // self.dp_size
        mine = self.global_indices(self.consumed)[read * per_rank:(read + 1) * per_rank]
        m = self.micro_batch_size
        return [self._micro_batch(mine[k:k + m]) for k in range(0, per_rank, m)]

    def _micro_batch(self, indices) -> MicroBatch:
        L = self.dataset.seq_len
        inputs, targets, cu = [], [], [np.zeros(1, dtype=np.int32)]
        for k, idx in enumerate(indices):
            x, y, c = self.dataset[int(idx)]
            inputs.append(x)
            targets.append(y)
            cu.append(c[1:] + k * L)  # c[0] == 0 is the previous sequence's end, already listed
        return MicroBatch(input_ids=torch.from_numpy(np.concatenate(inputs))[None],
                          targets=torch.from_numpy(np.concatenate(targets))[None],
                          cu_seqlens=torch.from_numpy(np.concatenate(cu).astype(np.int32)))

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_sequences": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("num_sequences", len(self.dataset))):
            if state[key] != mine:
                raise ValueError(f"data loader state was saved with {key}={state[key]} but this run has {key}={mine}; "
                                 "resuming would not continue the same sample order")
        self.consumed = int(state["consumed"])
