"""The GPU cost table of core-attention tasks and the per-task overhead fitted from it.

A table is JSON: `{"entries": [{"q_len": Q, "kv_len": K, "ms": T}, ...], ...}` where T is the
time of ONE task of Q causal queries over K keys (the queries are the last Q of the K keys) when
many such tasks share one varlen flash call (`python -m seqpar.bench disagg --profile-cost-table`
writes it). The planner's model is `time = a * (pairs + overhead)`; least squares on the relative
error (long tasks would otherwise drown the short ones, where the overhead shows) gives a and
a * overhead, and the overhead in score pairs is their ratio.

Entries may also hold `fwd_ms` (the forward alone) and `cudnn_pairs` / `triton_pairs` (how the
servers' call splits the task between the kernels): then `fit_triton_cost` gives what a score pair
costs on the Triton kernel in cuDNN pairs, per direction, at the table's head configuration.
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


# pieces below this many queries pay their fixed costs on few pairs (the overhead's share of the fit)
_RATIO_MIN_QUERIES = 512


def fit_triton_cost(table: dict) -> dict:
    """{"forward", "backward", "both"}: the median ms per score pair of the table's all-Triton tasks
    of at least 512 queries over that of its all-cuDNN ones, for the forward, the backward (fwd+bwd
    less fwd) and the two together: `planner.KernelSpeed.triton_cost` measured at this head
    configuration. ValueError where the table lacks per-direction times or either kind of task."""
    per_pair = {"cudnn": [], "triton": []}
    for e in table["entries"]:
        if "fwd_ms" not in e or "cudnn_pairs" not in e:
            raise ValueError("the cost table has no per-direction times (fwd_ms) or kernel split (cudnn_pairs): "
                             "profile it again with `python -m seqpar.bench disagg --profile-cost-table`")
        n = pairs(e["kv_len"] - e["q_len"], e["kv_len"], 0)
        if e["cudnn_pairs"] == n:
            kind = "cudnn"
        elif e["triton_pairs"] == n and e["q_len"] >= _RATIO_MIN_QUERIES:
            kind = "triton"
        else:
            continue
        per_pair[kind].append((e["fwd_ms"] / n, (e["ms"] - e["fwd_ms"]) / n, e["ms"] / n))
    if not per_pair["cudnn"] or not per_pair["triton"]:
        raise ValueError("the cost table needs tasks that run wholly on cuDNN and wholly on the Triton kernel "
                         f"(>= {_RATIO_MIN_QUERIES} queries) to compare them")
    median = lambda xs: sorted(xs)[len(xs) // 2]
    return {name: round(median([t[i] for t in per_pair["triton"]]) / median([t[i] for t in per_pair["cudnn"]]), 3)
            for i, name in enumerate(("forward", "backward", "both"))}
