"""Predictions of the benchmark cases that are not a whole training step: one attention layer of
the disagg benchmark per method, on the batches the benchmark drew. Shared by the calibration
(which fits the runtime extras on them) and the validation."""
from __future__ import annotations

from dataclasses import replace

from seqpar.sim.attention_cost import _single_call, attn_seconds, disagg_layer, perdoc_layer, ring_layer
from seqpar.sim.comm import placed

DISAGG_METHODS = {"dp_no_rebalance": "data parallel, no rebalancing", "disagg": "disagg (ping-pong)",
                  "disagg_no_pingpong": "disagg (no ping-pong)", "disagg_single": "disagg (single)",
                  "disagg_local_remote": "disagg (local, then remote)",
                  "ring": "ring (zigzag)", "per_doc_cp": "per-document CP"}

# which runtime extra (attention_cost.runtime_extra) each benchmark method pays
RUNTIME_OF = {"disagg": "disagg", "disagg_no_pingpong": "disagg", "disagg_single": "disagg",
              "disagg_local_remote": "disagg", "per_doc_cp": "per_doc_cp", "ring": "ring_packed"}


def bench_schedule(method: str, era: int) -> str:
    """The runtime schedule a disagg bench key timed: `disagg` ping-pong, `disagg_single` one call per
    server (d987b2e on), `disagg_local_remote` local then remote work, `disagg_no_pingpong` the era's schedule without ping-pong (one nano-batch in
    eras 0-1, the local halves since c8d5eb5 / e23bcd3, named `halves` since 219ea22)."""
    from seqpar.sim.attention_cost import default_schedule
    from seqpar.sim.eras import era_since

    if method == "disagg":
        return "ping_pong"
    if method in ("disagg_single", "disagg_local_remote"):
        return method.removeprefix("disagg_")
    return "halves" if era >= era_since("c8d5eb5") else default_schedule(era)


def disagg_method_seconds(method, bounds, s, calib, cluster) -> float:
    """One layer fwd+bwd of `method` on one batch (document `bounds` of the group's row)."""
    world, H, Hkv, D = s["world"], s["H"], s["Hkv"], s["D"]
    group = placed(world, 1, cluster.gpus_per_node)
    if method == "dp_no_rebalance":  # each rank its own micro-batch, no communication: the slowest
        per = bounds[-1] // world
        own = [tuple(x - r * per for x in bounds if r * per <= x <= (r + 1) * per) for r in range(world)]
        return max(attn_seconds(calib, [_single_call(b, Hkv < H)], H, D) for b in own)
    if method == "ring":
        return ring_layer(calib, cluster, [bounds], world, H, Hkv, D, group)[0]
    if method == "per_doc_cp":
        return perdoc_layer(calib, cluster, [bounds], world, H, Hkv, D, group)[0]
    return disagg_layer(calib, cluster, [bounds], world, H, Hkv, D, group, schedule=bench_schedule(method, calib.era),
                        eps=s.get("eps", 0.1), min_chunk=s.get("min_chunk", 128), task_overhead=s.get("task_overhead"))[0]


_CASES: dict = {}


def disagg_case(method, s, calib, cluster):
    """(measured s, predicted s, local tokens, batches) of `method` averaged over the sample's batches,
    or None where the method was not measured. Kept per (method, sample, constants, cluster): the
    leave-one-group-out fits ask for the same cases with the same constants many times."""
    memo = (method, id(s), repr(replace(calib, sources={})), repr(cluster))
    if memo not in _CASES:
        _CASES[memo] = (s, _disagg_case(method, s, calib, cluster))  # s held: its id stays its own
    return _CASES[memo][1]


def _disagg_case(method, s, calib, cluster):
    key = f"{method}_ms"
    rows = [(b, r) for b, r in s["batches"] if key in r]
    if not rows:
        return None
    # what the run's dispatcher chose: packed calls' kernel, the servers' lse calls on the split (and its
    # prefix rule) or not
    calib = replace(calib, packed_kernel=s.get("packed_kernel", "triton"), lse_split=s.get("lse_split"),
                    lse_prefix=s.get("lse_prefix"))
    measured = sum(r[key] for _, r in rows) / len(rows) / 1e3
    pred = sum(disagg_method_seconds(method, b, s, calib, cluster) for b, _ in rows) / len(rows)
    return measured, pred, sum(b[-1] for b, _ in rows) / len(rows) / s["world"], len(rows)
