"""Count what torch.distributed moves: a context that wraps its collective and P2P calls.

Used by the tests (a method's bytes per layer must not grow with the sequence) and by the
benchmarks (bytes per layer in the JSON). Callers must reach the collectives through the module
(`dist.all_gather(...)`), as seqpar does everywhere, for the wrapper to see them.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# Calls whose first two arguments are (output, input) buffers or a single buffer.
_OPS = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "reduce_scatter",
        "reduce_scatter_tensor", "reduce_scatter_single",
        "all_to_all", "all_to_all_single", "broadcast", "reduce", "gather", "scatter",
        "send", "recv", "isend", "irecv")


@dataclass
class Traffic:
    calls: Counter = field(default_factory=Counter)  # op name -> number of calls
    bytes: Counter = field(default_factory=Counter)  # op name -> payload bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())


def _nbytes(x) -> int:
    if torch.is_tensor(x):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


@contextmanager
def count_traffic():
    """Yields a `Traffic` that counts, per op, the calls and their payload as this rank sees it:
    the larger of the call's output and input buffers (a gather counts what it gathers, a
    reduction the reduced tensor, a send or receive its message)."""
    traffic = Traffic()
    originals = {name: getattr(dist, name) for name in _OPS if hasattr(dist, name)}

    def wrap(name, fn):
        def counted(*args, **kwargs):
            buffers = list(args[:2]) + [kwargs[k] for k in ("tensor", "output_tensor", "input_tensor", "output",
                                                           "input", "tensor_list") if k in kwargs]
            traffic.calls[name] += 1
            traffic.bytes[name] += max((_nbytes(b) for b in buffers), default=0)
            return fn(*args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield traffic
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
