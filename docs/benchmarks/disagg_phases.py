"""Forward and backward attention balance of disagg's plans, step by step, in the runs of
`disagg_dp_cp_gpu.sh` (CPU only: the same seeded rows and plans as cudnn_shapes.py). The planner
balances one cost per server, a Triton score pair weighing `triton_cost` (1.7: the backward's ratio)
cuDNN pairs; but every layer waits for its slowest server in each direction, and a Triton pair
costs ~1.06 cuDNN pairs forward, ~1.74 backward (2026-11-26-2gpu-9th/call7). A server given Triton
work is then balanced in the backward, not in the forward. Prints per step the modelled forward and
backward imbalance (max / mean over servers), each server's cuDNN and Triton pairs (G) and the
plan's own imbalance before and after.

    python docs/benchmarks/disagg_phases.py [SEQ] [STEPS] [EPS] [TRITON_COST] [prefix] [per_direction]
                                            [LANE_DIR/LANE] [timeline=DIR:STEP]   (default 65536 18 0.1 1.7)

`timeline=DIR:STEP` (a `disagg_waits_gpu.sh timeline` folder and its profiled step, run with the same
EPS and TRITON_COST): each kernel family's time on both ranks over the step's planned pairs, so the
Triton / cuDNN ratio of each direction and cuDNN's backward / forward time per pair as that run
measured them (`65536 9 0.02 1.7 timeline=docs/benchmarks/2026-11-27-gpu-14th/call2/timeline:9`, the
64-key dk/dv tile: 1.157, 1.929, 2.712; rank 0's large Triton tasks alone 1.10 and 1.90).

EPS, TRITON_COST: parallel.disagg.eps, .triton_cost; `prefix`: the servers' causal pieces over a
prefix on cuDNN (SEQPAR_CUDNN_PREFIX=1); `per_direction`: parallel.disagg.plans=per_direction, the
forward's columns from a plan made with a Triton pair at planner.TRITON_FWD_COST (eps 0.02: forward
1.048 -> 1.007, backward 1.005 either way; eps 0.1: 1.049 -> 1.017, backward 1.037). The last line: the means over steps 3 on, the imbalance of
both directions weighted by their times (the backward 2.6x the forward) and the bytes moved.
LANE_DIR/LANE (a lane folder of the script holding dp2_as0, dp2_as1 and LANE's metrics, run with
the same EPS and TRITON_COST): each step's measured ratio to the mean of the as0 / as1 lanes beside
the model, and the correlation of the ratios with each direction's modelled imbalance.

With LANE it also fits a step-time model on the as0 / as1 lanes (`_step_model`) and predicts each
disagg step from its servers' loads. Thirteenth session, on the twelfth's call 1 (eps 0.02): base
1.41 s + 0.257 s per G weighted pairs; predicted 1.017x the ideal over steps 3-18 against 1.051x
measured (correlation 0.48); a Triton backward 10 / 20 / 30% faster (replanned at a weight as much
lower) predicts 1.015 / 1.011 / 1.007x: ~1 point. The ~3.4% between model and measurement is what
the model leaves out, the transfers (31 ms a step exposed on rank 0) and host time per layer; `disagg_waits_gpu.sh timeline` with
LANE=dp2_disagg_eps02 on a step that moves much (PSTEP=9) shows which.

Twelfth session (2026-11-27-2gpu-12th/call1, eps 0.02): correlation 0.89 with the forward, 0.14 with
the backward; call 2 (TRITON_COST 1.05: forward balanced, backward 1.11-1.23 in the heavy steps)
ran 1.079x the ideal against 1.053x. Both directions count.

Eleventh session (call 4's rows, prefix pieces on Triton), means of steps 3-18: eps 0.1 forward
1.049, backward 1.037, weighted 1.040, 102 MB into the servers per layer's forward; eps 0.05: 1.039
/ 1.019 / 1.025, 110 MB; eps 0.02: 1.048 / 1.005 / 1.017, 108 MB. Choosing among the planner's
candidate moves by the waits of each direction (tried, not kept) gave 1.015 at eps 0.02 for 152 MB."""
import json
import re
import sys
from dataclasses import replace

from cudnn_shapes import _rows

from seqpar.attention.disagg import KernelSpeed, plan
from seqpar.attention.disagg.planner import TRITON_FWD_COST
from seqpar.attention.disagg.options import DisaggOptions, planner_overhead
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len

FORWARD, BACKWARD = 1.06, 1.74  # a Triton pair in cuDNN pairs (planner.TRITON_COST's run)
BACKWARD_TIME = 2.6  # cuDNN's backward time per pair over its forward's


# kernel families in a profiled step's table (step<N>_rank<r>.txt): the Triton kernels' and cuDNN's
FAMILIES = {("triton", "fwd"): ("_attn_fwd",), ("triton", "bwd"): ("_attn_bwd_dkdv", "_attn_bwd_dq", "_bwd_prep"),
            ("cudnn", "fwd"): ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop",),
            ("cudnn", "bwd"): ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop",)}


def _self_cuda_ms(path):
    """(kernel name, its Self CUDA ms) rows of a torch.profiler table (names cut at 55 characters
    can repeat: a list, not a dict)."""
    out = []
    for line in open(path):
        cols = re.split(r"\s{2,}", line.strip())
        m = re.fullmatch(r"([\d.]+)(us|ms|s)", cols[6]) if len(cols) == 11 else None
        if m:
            out.append((cols[0], float(m[1]) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m[2]]))
    return out


def _timeline_ratios(folder, step, row):
    """Per direction, a Triton pair's time over a cuDNN pair's on both ranks of a profiled step, and
    cuDNN's backward time per pair over its forward's (`row`: the model's row of that step)."""
    ms = {key: 0.0 for key in FAMILIES}
    for rank in (0, 1):
        for name, t in _self_cuda_ms(f"{folder}/step{step}_rank{rank}.txt"):
            for key, prefixes in FAMILIES.items():
                if name.startswith(prefixes):
                    ms[key] += t
    per_pair = {(kind, d): ms[kind, d] / sum(row[f"{kind}_G"]) for kind, d in ms}
    return {"forward": round(per_pair["triton", "fwd"] / per_pair["cudnn", "fwd"], 3),
            "backward": round(per_pair["triton", "bwd"] / per_pair["cudnn", "bwd"], 3),
            "backward_time": round(per_pair["cudnn", "bwd"] / per_pair["cudnn", "fwd"], 3),
            "ms": {f"{k}_{d}": round(t, 1) for (k, d), t in ms.items()}}


def main(seq=65536, steps=18, eps=0.1, triton_cost=1.7, prefix=False, lane=None, per_direction=False, timeline=None):
    rows, heads, head_dim = _rows(seq, steps)
    opts = DisaggOptions(eps=eps, triton_cost=triton_cost)
    speed = KernelSpeed(min_doc_len(heads), max_doc_len(heads, head_dim, 2), prefix, opts.triton_cost)
    row_bytes = (heads * 2 * head_dim * 2, 8 * 2 * head_dim * 2)
    imbalance = lambda x: max(x) / (sum(x) / len(x))  # noqa: E731
    out = []
    fwd_speed = replace(speed, triton_cost=TRITON_FWD_COST) if per_direction else speed

    def pairs_by_kernel(p):  # per server: (cuDNN pairs, Triton pairs)
        x = [[0, 0], [0, 0]]
        for t in p.tasks:
            c, tr = speed.by_kernel(t.q_end - t.q_start, t.q_end - t.kv_start, True)
            x[0][t.server] += c
            x[1][t.server] += tr
        return x

    def plan_at(r0, r1, s):  # the runtime's plan of a step's two rows joined, at KernelSpeed s
        return plan(r0 + [seq + b for b in r1[1:]], 2, eps=opts.eps, min_chunk=opts.min_chunk,
                    overhead=planner_overhead(opts), row_bytes=row_bytes, speed=s)

    for step, (r0, r1) in enumerate(rows, 1):
        p, pf = (plan_at(r0, r1, s) for s in (speed, fwd_speed))
        cudnn, triton = pairs_by_kernel(p)
        fwd = [c + FORWARD * t for c, t in zip(*pairs_by_kernel(pf))]
        bwd = [c + BACKWARD * t for c, t in zip(cudnn, triton)]
        out.append({"step": step, "forward": round(imbalance(fwd), 3), "backward": round(imbalance(bwd), 3),
                    "cudnn_G": [round(x / 1e9, 3) for x in cudnn], "triton_G": [round(x / 1e9, 3) for x in triton],
                    "plan_before": round(p.initial_imbalance, 3), "plan_after": round(p.imbalance, 3),
                    "moved_MB": round(p.bytes_moved / 1e6, 1)})
    def loads(weight):  # per step, per server: (cuDNN pairs, Triton pairs) of plans made at this Triton weight
        return [pairs_by_kernel(plan_at(r0, r1, replace(speed, triton_cost=weight))) for r0, r1 in rows]

    fit = _fit(out, lane) if lane else None
    if lane:
        fit["step_model"] = _step_model(out, rows, speed, lane, loads)
    for row in out:
        print(json.dumps(row))
    if fit:
        print(json.dumps(fit))
    if timeline:
        folder, step = timeline.rsplit(":", 1)
        print(json.dumps({"timeline": _timeline_ratios(folder, int(step), out[int(step) - 1])}))
    later = out[2:]  # the benchmarks' mean skips steps 1-2
    mean = lambda key: sum(r[key] for r in later) / len(later)  # noqa: E731
    print(json.dumps({"steps_3+": {"forward": round(mean("forward"), 3), "backward": round(mean("backward"), 3),
                                   "weighted": round((mean("forward") + BACKWARD_TIME * mean("backward"))
                                                     / (1 + BACKWARD_TIME), 3),
                                   "moved_MB": round(mean("moved_MB"), 1)}}))


def _fit(model, lane):
    """Each step's measured ratio disagg / mean(as0, as1) of lane folder `lane` beside `model`'s rows."""
    folder, name = lane.rsplit("/", 1)
    read = lambda n: [json.loads(x) for x in open(f"{folder}/{n}_metrics.jsonl")]  # noqa: E731
    as0, as1, run = read("dp2_as0"), read("dp2_as1"), read(name)
    ratios = [m["step_time_s"] * 2 / (a["step_time_s"] + b["step_time_s"]) for a, b, m in zip(as0, as1, run)]
    for r, row in zip(ratios, model):
        row["measured"] = round(r, 3)
    later = model[2:len(ratios)]
    return {"correlation": {d: round(_corr([r["measured"] for r in later], [r[d] for r in later]), 3)
                            for d in ("forward", "backward")}}


def _step_model(model, rows, speed, lane, loads):
    """Step time = base + rate x attention, attention = the slowest server's forward pairs plus
    BACKWARD_TIME x its backward's, in cuDNN forward pairs (Triton pairs at FORWARD / BACKWARD):
    base and rate fitted by least squares on the dp2_as0 / dp2_as1 steps 3 on (each rank its own rows,
    short documents on Triton there too); then each step's disagg time predicted from `model`'s
    servers (exposed transfers left out), its ratio to the ideal beside the measured one, and what
    the mean ratio would be with a Triton backward at BACKWARD x 0.9 / 0.8 / 0.7 (planned at the
    planner's weight x the same factor; the ideal's own Triton pairs faster too)."""
    folder = lane.rsplit("/", 1)[0]
    read = lambda n: [json.loads(x)["step_time_s"] for x in open(f"{folder}/{n}_metrics.jsonl")]  # noqa: E731
    as0, as1 = read("dp2_as0"), read("dp2_as1")

    def own(bounds, bwd):  # a rank running its own rows: every document a task of its own
        c = t = 0
        for a, b in zip(bounds, bounds[1:]):
            x, y = speed.by_kernel(b - a, b - a, True)
            c, t = c + x, t + y
        return c + FORWARD * t + BACKWARD_TIME * (c + bwd * t)

    n = min(len(as0), len(as1), len(model))
    xs = [own(r[i], BACKWARD) for r in rows[2:n] for i in (0, 1)]  # steps 1-2 compile and warm up
    ys = [y for pair in zip(as0[2:n], as1[2:n]) for y in pair]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    rate = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    base = my - rate * mx

    def ratios(bwd, servers):
        out = []
        for (cudnn, triton), (r0, r1) in zip(servers[:n], rows[:n]):
            fwd = max(c + FORWARD * t for c, t in zip(cudnn, triton))
            back = max(c + bwd * t for c, t in zip(cudnn, triton))
            ideal = base + rate * (own(r0, bwd) + own(r1, bwd)) / 2
            out.append((base + rate * (fwd + BACKWARD_TIME * back)) / ideal)
        return out

    now = ratios(BACKWARD, loads(speed.triton_cost))
    later = slice(2, n)
    mean = lambda x: round(sum(x[later]) / len(x[later]), 3)  # noqa: E731
    return {"base_s": round(base, 3), "s_per_G_pairs": round(rate * 1e9, 4),
            "predicted": [round(r, 3) for r in now], "predicted_mean": mean(now),
            "measured_mean": mean([r["measured"] for r in model[:n]]),
            "correlation": round(_corr([r["measured"] for r in model[later]], now[later]), 3),
            "triton_backward_faster": {f"x{f}": mean(ratios(BACKWARD * f, loads(speed.triton_cost * f)))
                                       for f in (0.9, 0.8, 0.7)}}


def _corr(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else 0.0


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a in ("prefix", "per_direction") or "/" in a]
    args = [a for a in sys.argv[1:] if a not in flags]
    main(*(int(a) for a in args[:2]), *(float(a) for a in args[2:4]), prefix="prefix" in flags,
         lane=next((a for a in flags if "/" in a and not a.startswith("timeline=")), None),
         per_direction="per_direction" in flags,
         timeline=next((a[len("timeline="):] for a in flags if a.startswith("timeline=")), None))
