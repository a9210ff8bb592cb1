"""A request to stop early, raised by a signal and honoured at the next step boundary.

Slurm sends `--signal=USR1@N` N seconds before a job's time limit (and `scancel --signal=USR1`
sends it at any time). The handler only sets a flag: saving a checkpoint inside a signal handler
could interrupt a collective halfway. The training loop asks `agreed()` once per step; the flag is
max-reduced over every rank because the signal reaches the ranks at different moments, and all of
them must checkpoint the same step and stop together.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

_installed = False
_received = False
_stopped = False


def install(signum: int = signal.SIGUSR1) -> None:
    """Catch `signum` in this process (the main thread's job, so call it from there)."""
    global _installed

    def on_signal(_signum, _frame):
        global _received
        _received = True

    signal.signal(signum, on_signal)
    _installed = True


def agreed(device: torch.device) -> bool:
    """True on every rank once any rank has received the signal; collective when installed.

    Without an installed handler it is False at once, so local runs pay no extra all-reduce."""
    global _stopped
    if not _installed:
        return False
    flag = torch.tensor([int(_received)], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    _stopped = bool(flag.item())
    return _stopped


def stopped() -> bool:
    """Whether the training loop stopped early on the signal (and so the job is not finished)."""
    return _stopped
