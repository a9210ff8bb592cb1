"""The GPU cost table of core-attention tasks and the per-task overhead fitted from it.

A table is JSON: `{"entries": [{"q_len": Q, "kv_len": K, "ms": T}, ...], ...}` where T is the
time of ONE task of Q causal queries over K keys (the queries are the last Q of the K keys) when
many such tasks share one varlen flash call (`python -m seqpar.bench disagg --profile-cost-table`
writes it). The planner's model is `time = a * (pairs + overhead)`; least squares on the relative
error (long tasks would otherwise drown the short ones, where the overhead shows) gives a and
a * overhead, and the overhead in score pairs is their ratio.
"""
from __future__ import annotations

import json
import os

from seqpar.attention.disagg.planner import pairs


def load_cost_table(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"parallel.disagg.cost_table={path}: file not found (write one on a GPU with "
                         "`python -m seqpar.bench disagg --profile-cost-table FILE.json`, or leave it null)")
    with open(path) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"parallel.disagg.cost_table={path}: not JSON ({e})") from None
    entries = table.get("entries") if isinstance(table, dict) else None
    if not entries or not all(isinstance(e, dict) and {"q_len", "kv_len", "ms"} <= set(e) for e in entries):
        raise ValueError(f"parallel.disagg.cost_table={path}: needs an 'entries' list of "
                         "{'q_len', 'kv_len', 'ms'} objects")
    for e in entries:
        if not (1 <= e["q_len"] <= e["kv_len"] and e["ms"] > 0):
            raise ValueError(f"parallel.disagg.cost_table={path}: entry {e} needs 1 <= q_len <= kv_len and ms > 0")
    return table


def fit_task_overhead(table: dict) -> int:
    """Per-task overhead in score pairs: the fitted `time = a * pairs + b`, overhead = b / a
    (0 when the fit finds no fixed cost)."""
    # weighted least squares, weight 1/t^2: minimises the relative error of the model
    sw = sx = sy = sxx = sxy = 0.0
    for e in table["entries"]:
        x, y = float(pairs(e["kv_len"] - e["q_len"], e["kv_len"], 0)), float(e["ms"])
        w = 1.0 / (y * y)
        sw, sx, sy, sxx, sxy = sw + w, sx + w * x, sy + w * y, sxx + w * x * x, sxy + w * x * y
    det = sw * sxx - sx * sx
    if len(table["entries"]) < 2 or det <= 0:
        raise ValueError("the cost table needs at least two entries of different sizes to fit an overhead")
    a = (sw * sxy - sx * sy) / det
    b = (sy - a * sx) / sw
    if a <= 0:
        raise ValueError(f"the cost table's time does not grow with the work (fitted slope {a:.3g} ms/pair)")
    return max(0, round(b / a))
