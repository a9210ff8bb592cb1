"""Per-step numbers of core-attention disaggregation, for the training loop's log line (`sp/`
keys): every `disagg_attention` call records its plan's modelled imbalance before and after
planning, its task count, planning time (plans are cached, so only new boundaries cost) and the
bytes this rank sends to other ranks in forward and backward. `step_metrics()` returns the
step's summary and starts the next step."""
from __future__ import annotations

_calls: list = []
_bytes = 0


def record_call(info: dict, sent_bytes: int, new: bool) -> None:
    global _bytes
    _calls.append(dict(info, new=new))
    _bytes += sent_bytes


def step_metrics(reset: bool = True) -> dict:
    """{} when no disagg call ran since the last reset. Imbalances (max/mean of the modelled
    attention cost over servers) and tasks are means over the calls; bytes are this rank's total
    to other ranks (every layer, forward + backward); plan_ms is the step's planning time."""
    global _bytes
    if not _calls:
        return {}
    n = len(_calls)
    out = {"sp/attn_imbalance_before": sum(c["imbalance_before"] for c in _calls) / n,
           "sp/attn_imbalance_after": sum(c["imbalance_after"] for c in _calls) / n,
           "sp/tasks": sum(c["tasks"] for c in _calls) / n,
           "sp/bytes_moved": _bytes,
           "sp/plan_ms": sum(c["plan_ms"] for c in _calls if c.get("new")),
           "sp/disagg_calls": n}
    if reset:
        _calls.clear()
        _bytes = 0
    return out
