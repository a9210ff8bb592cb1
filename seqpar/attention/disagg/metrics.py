"""Per-step numbers of core-attention disaggregation, for the training loop's log line (`sp/`
keys): every `disagg_attention` call records its plan's modelled imbalance before and after
planning, its task count, planning time (plans are cached, so only new boundaries cost) and the
bytes this rank sends to other ranks in forward and backward; every wait on a transfer records
how long compute stood still for it (exposed communication). `step_metrics()` returns the step's
summary and starts the next step. Running sums only: nothing grows if nobody reads them."""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

_MAX_PENDING = 1024  # CUDA event pairs kept unread before the oldest are folded into the sum
# Where compute waits: for the inputs at the servers and for the results back at the owners, in
# forward and backward. Split by phase (and the longest single wait) the step's exposed time tells
# a transfer that is slow everywhere from one rank late at some layers or in one direction.
PHASES = ("fwd_in", "fwd_out", "bwd_in", "bwd_out")


class _Step:
    def __init__(self):
        self.calls = 0
        self.before = self.after = self.tasks = self.plan_ms = 0.0
        self.bytes = 0
        self.exposed_ms = 0.0
        self.by_phase = dict.fromkeys(PHASES, 0.0)
        self.longest = 0.0
        self.pending = []  # (phase, start, end) CUDA events around waits, read at the end of the step

    def add(self, phase: str, ms: float):
        self.exposed_ms += ms
        self.by_phase[phase] += ms
        self.longest = max(self.longest, ms)

    def fold(self, keep: int = 0):
        while len(self.pending) > keep:
            phase, start, end = self.pending.pop(0)
            end.synchronize()
            self.add(phase, start.elapsed_time(end))


_step = _Step()


def record_call(info: dict, sent_bytes: int, new: bool) -> None:
    _step.calls += 1
    _step.before += info["imbalance_before"]
    _step.after += info["imbalance_after"]
    _step.tasks += info["tasks"]
    _step.plan_ms += info["plan_ms"] if new else 0.0
    _step.bytes += sent_bytes


@contextlib.contextmanager
def exposed_wait(device: torch.device, phase: str):
    """Around the wait for a transfer of `phase` (PHASES): on CUDA, events on the compute stream
    (the wait makes it stall until the transfer is done, so their distance is the exposed time);
    else host time."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        _step.pending.append((phase, start, end))
        if len(_step.pending) > _MAX_PENDING:
            _step.fold(keep=_MAX_PENDING // 2)
    else:
        t0 = time.perf_counter()
        yield
        _step.add(phase, (time.perf_counter() - t0) * 1e3)


_marks: list | None = None  # (label, CUDA event or host time) while a `timeline` records


@contextlib.contextmanager
def timeline(device: torch.device):
    """Records the `mark`s of every disagg call inside the block. Yields a list that afterwards
    holds this rank's (label, ms since the first mark): when each transfer was ready, each
    nano-batch's kernel done, each direction's end; on CUDA as the compute stream reached them."""
    global _marks
    _marks, out = [], []
    try:
        yield out
    finally:
        marks, _marks = _marks, None
        if marks and device.type == "cuda":
            marks[-1][1].synchronize()
            out += [(label, round(marks[0][1].elapsed_time(e), 3)) for label, e in marks]
        elif marks:
            out += [(label, round((t - marks[0][1]) * 1e3, 3)) for label, t in marks]


def mark(label: str, device: torch.device) -> None:
    if _marks is None:
        return
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        _marks.append((label, event))
    else:
        _marks.append((label, time.perf_counter()))


def step_metrics(reset: bool = True, group=None) -> dict:
    """{} when no disagg call ran since the last reset. Imbalances (max/mean of the modelled
    attention cost over servers) and tasks are means over the calls; bytes are this rank's total
    to other ranks (every layer, forward + backward); plan_ms is the step's planning time;
    exposed_comm_ms the time this rank's compute waited for transfers, split by PHASES
    (exposed_<phase>_ms), and exposed_max_ms its longest single wait. With a process `group`
    (a collective: all its ranks call) also exposed_comm_ms_max / _min over its ranks: the rank
    that waits least is the one the others wait for."""
    global _step
    s = _step
    if reset:
        _step = _Step()
    s.fold()
    spread = _spread(s.exposed_ms, group) if group is not None else {}
    if not s.calls:
        return {}
    out = {"sp/attn_imbalance_before": s.before / s.calls, "sp/attn_imbalance_after": s.after / s.calls,
           "sp/tasks": s.tasks / s.calls, "sp/bytes_moved": s.bytes, "sp/plan_ms": s.plan_ms,
           "sp/exposed_comm_ms": s.exposed_ms, "sp/exposed_max_ms": s.longest, "sp/disagg_calls": s.calls}
    out.update({f"sp/exposed_{phase}_ms": ms for phase, ms in s.by_phase.items()})
    return out | spread


def _spread(exposed_ms: float, group) -> dict:
    on_gpu = dist.get_backend(group) == "nccl"
    x = torch.tensor([exposed_ms, -exposed_ms], dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return {"sp/exposed_comm_ms_max": x[0].item(), "sp/exposed_comm_ms_min": -x[1].item()}
