"""Predicted against measured for every case the committed benchmarks hold.

Each case is predicted twice: with the calibration fitted on everything (`predicted_s`), and with
one fitted without the case's own group of rows (`loo_predicted_s`, leave-one-group-out: a ring
row at 32k is predicted from constants fitted on the 128k and packed rows). Both use the constants
of the case's code era (`eras.CODE_CHANGES`): a run describes the code it ran. `in_sample` names the
constants whose fit used the case. Cases of a card that ran below its usual speed (its same-call
anchor far below ANCHORS.md) are listed under `excluded` with the reason, and so are runs whose
step times another job on the host slowed (`measurements.CONTAMINATED_TIMES`: their prediction
beside the measured time, their memory peak still a memory twin)."""
from __future__ import annotations

import datetime
import json
import os
from dataclasses import replace

from seqpar.sim.attention_cost import _single_call, allgather_layer, lasp_layer, ring_layer
from seqpar.sim.calibrate import calibrate
from seqpar.sim.cases import DISAGG_METHODS, RUNTIME_OF, disagg_case
from seqpar.sim.eras import CODE_CHANGES, cluster_preset_of, era_since
from seqpar.sim.measurements import (diagnostic_exclusions, disagg_samples, e2e_samples, kernel_samples, lasp_samples,
                                     load_benchmarks, maxlen_exclusions, maxlen_memory_samples, memory_peak_samples,
                                     ring_samples)
from seqpar.sim.cluster import load_cluster
from seqpar.sim.comm import placed
from seqpar.sim.compute import linear_attn_time

GOAL = 0.10


def _rel(pred, meas):
    return (pred - meas) / meas


def _attn_case(s, calib, cluster):
    from seqpar.sim.attention_cost import attn_seconds

    group = placed(s["world"], 1, cluster.gpus_per_node)
    calib = replace(calib, packed_kernel="flash")  # the ring bench forces torch's kernels (SEQPAR_ATTN_KERNEL)
    if s["kind"] == "single":
        return attn_seconds(calib, [_single_call(s["bounds"])], s["H"], s["D"], s["family"])
    if s["kind"] == "allgather":
        return allgather_layer(calib, cluster, [s["bounds"]], s["world"], s["H"], s["H"], s["D"], group,
                               s["family"])[0]
    total, _, compute = ring_layer(calib, cluster, [s["bounds"]], s["world"], s["H"], s["H"], s["D"], group, s["family"],
                                   layout=s.get("layout", "zigzag"))
    return compute if s["kind"] == "ring_compute" else total


def _kernel_case(s, calib):
    """A kernels bench row: the packed call on the kernel it names."""
    from seqpar.sim.attention_cost import attn_seconds, split_call_seconds
    from seqpar.sim.compute import AttnCall

    call = AttnCall.varlen(s["docs"])
    if s["kernel"] == "split":
        return split_call_seconds(calib, call, s["H"], s["D"], s["per_octave"])
    return attn_seconds(replace(calib, packed_kernel=s["kernel"]), [call], s["H"], s["D"])


def _lasp_case(s, calib, cluster, single=False):
    if single:
        return linear_attn_time(s["tokens"], s["H"], s["D"], s["D"], calib.linear_tokens_per_s, calib.linear_ref_hdd)
    group = placed(s["world"], 1, cluster.gpus_per_node)
    method = "lasp1" if s["method"] == "lasp1" else "lasp2"
    return lasp_layer(calib, cluster, [(0, s["tokens"])], s["world"], s["H"], s["D"], group, method)[0]


def _e2e_case(s, calib, cluster):
    from seqpar.sim.configs import plain_config
    from seqpar.sim.step import memory_per_rank, predict_step

    from seqpar.sim.eras import era_overrides

    cfg = plain_config(s["overrides"] + era_overrides(s["era"], s["overrides"]))
    # what the run's dispatcher chose (and SEQPAR_CUDNN_PREFIX where a lane set it)
    calib = replace(calib, packed_kernel=s.get("packed_kernel", "triton"), lse_prefix=s.get("lse_prefix"))
    step = predict_step(cfg, s["world"], cluster, calib, torch_elementwise=s["torch_elementwise"])
    # runs before the split (235a598) never allocated its cuDNN scratch
    return step["step_s"], memory_per_rank(cfg, s["world"], split=s["era"] >= era_since("235a598"))["total_gib"]


def _case(name, measured, pred, loo, world, file, in_sample, note="", era=0):
    return {"name": name, "world": world, "era": era, "measured_s": round(float(measured), 6), "predicted_s": round(float(pred), 6),
            "rel_err": round(float(_rel(pred, measured)), 4), "loo_predicted_s": round(float(loo), 6),
            "loo_rel_err": round(float(_rel(loo, measured)), 4), "in_sample": in_sample, "file": os.path.relpath(file),
            **({"note": note} if note else {})}


def validate(root=None) -> dict:
    cluster = load_cluster("h100_8x400g")  # the constants are fitted with its links (calibrate)
    found = load_benchmarks(root)
    full = calibrate(root)
    cases, memory, excluded = [], [], []
    own = lambda s: calibrate(root, era=s["era"])
    loo = lambda s: calibrate(root, exclude=(s["group"],), era=s["era"])

    for s in ring_samples(found):
        label = {"single": "attention 1 GPU", "ring_compute": "ring compute only", "ring": "ring",
                 "allgather": "all-gather"}[s["kind"]]
        docs = len(s["bounds"]) - 1
        name = (f"{label} {s['family']} S={s['S'] // 1024}k" + (f" packed {docs} docs" if docs > 1 else "")
                + ("" if s["kind"] == "single" else f" on {s['world']} GPUs"))
        layout = s.get("layout", "zigzag")
        if layout != "zigzag":
            name = name.replace(f"{label} ", f"{label} {layout} ", 1)
        fits = ["attention kernel"] if s["kind"] != "ring" or docs == 1 else []
        if s["kind"] == "ring" and docs == 1:
            fits.append("overlap tax")
        if s["kind"] == "ring" and docs > 1:
            fits = ["runtime extra"]  # packed ring rows fit only the packed ring's runtime extra
        if layout != "zigzag" and s["kind"] == "ring_compute" or s["kind"] == "allgather":
            fits = []  # doc_zigzag compute-only rows and the all-gather's feed no fit
        cases.append(_case(name, s["measured"], _attn_case(s, own(s), cluster), _attn_case(s, loo(s), cluster),
                           s["world"] if s["kind"] != "single" else 1, s["file"], fits, era=s["era"]))

    for s in kernel_samples(found):
        label = {"flash": "torch varlen flash", "triton": "seqpar Triton flash", "split": "split (cuDNN + Triton)"}
        name = f"kernel {label[s['kernel']]} 1 GPU S={s['S'] // 1024}k packed {len(s['docs'])} docs"
        cases.append(_case(name, s["measured"], _kernel_case(s, own(s)), _kernel_case(s, loo(s)), 1, s["file"],
                           ["Triton packed ratio"] if s["kernel"] != "split" else [], era=s["era"]))

    seen_single = set()
    for s in lasp_samples(found):
        if s["single"] and s["tokens"] not in seen_single:
            seen_single.add(s["tokens"])
            cases.append(_case(f"lightning kernel 1 GPU T={s['tokens'] // 1024}k", s["single"],
                               _lasp_case(s, own(s), cluster, True), _lasp_case(s, own(s), cluster, True), 1, s["file"],
                               [], "kernel rate fitted on the kernels bench, a different run", era=s["era"]))
        if s["method"] == "lasp2_overlapped":
            excluded.append({"name": f"LASP-2 overlapped schedule T={s['tokens'] // 1024}k on {s['world']} GPUs",
                             "measured_s": s["measured"],
                             "reason": "a schedule the benchmark compares against; lasp2_attention runs another one "
                                       "(faster over NVLink), which is what the simulator models"})
            continue
        label = {"lasp2": "LASP-2 (what lasp2_attention runs)", "lasp1": "LASP-1"}[s["method"]]
        if s.get("not_comparable"):
            excluded.append({"name": f"{label} T={s['tokens'] // 1024}k on {s['world']} GPUs "
                                     f"({os.path.basename(os.path.dirname(s['file']))})",
                             "measured_s": s["measured"], "reason": s["not_comparable"]})
            continue
        cases.append(_case(f"{label} T={s['tokens'] // 1024}k on {s['world']} GPUs", s["measured"],
                           _lasp_case(s, own(s), cluster), _lasp_case(s, loo(s), cluster), s["world"], s["file"],
                           ["lasp extra"] if s["method"] == "lasp2" else [], era=s["era"]))

    for s in disagg_samples(found):
        loo_calib = loo(s)
        for method, label in DISAGG_METHODS.items():
            case = disagg_case(method, s, own(s), cluster)
            if case is None:
                continue
            measured, pred, _, n = case
            loo_pred = disagg_case(method, s, loo_calib, cluster)[1]
            size = f"{s['tokens'] // 1024}k" if s["tokens"] >= 1024 else str(s["tokens"])
            fits = ["runtime extra"] if method in RUNTIME_OF else []
            cases.append(_case(f"{label}, {s['mix']} {size} tokens per rank", measured, pred, loo_pred,
                               s["world"], s["file"], fits, f"mean over {n} batches", era=s["era"]))

    samples = e2e_samples(found)
    # the memory estimate describes today's code: of runs of one configuration, the latest era's
    # peak validates it (the code eras above are the simulator's for time, not for memory)
    latest = {}
    for s in samples:
        key = (tuple(s["overrides"]), s["world"])
        if s["measured_mem_gib"] and (key not in latest or s["era"] >= latest[key]["era"]):
            latest[key] = s
    for s in samples:
        newer = latest.get((tuple(s["overrides"]), s["world"]))
        if s["measured_mem_gib"] and newer is not s and newer["era"] > s["era"]:
            excluded.append({"name": f"memory of {s['name']}", "measured_s": None,
                             "reason": f"the same configuration measured again with later code ({newer['name']}, "
                                       f"{newer['measured_mem_gib']:.2f} GiB against {s['measured_mem_gib']:.2f} here)"})
            s = {**s, "measured_mem_gib": None}
        if s["unhealthy"]:
            excluded.append({"name": s["name"], "measured_s": s["measured"], "reason": s["unhealthy"]})
            continue
        card = load_cluster(cluster_preset_of(s["file"]))
        if s.get("contaminated"):  # its time slowed by something else on the host; its memory peak is its own
            pred, mem = _e2e_case(s, own(s), card)
            excluded.append({"name": s["name"], "measured_s": s["measured"], "predicted_s": round(float(pred), 6),
                             "reason": s["contaminated"], "file": os.path.relpath(s["file"])})
            if s["measured_mem_gib"]:
                memory.append({"name": s["name"], "measured_gib": round(s["measured_mem_gib"], 3),
                               "predicted_gib": round(mem, 3), "rel_err": round(_rel(mem, s["measured_mem_gib"]), 4)})
            continue
        # a whole step's matmuls and element-wise passes run at the card's own figures (H100 or H200)
        pred, mem = _e2e_case(s, own(s), card)
        # a run with no fit role feeds no constant: the fit without its group is the full one
        loo_pred = _e2e_case(s, loo(s), card)[0] if s.get("fit") else pred
        kernels_run = s["fit"] == "compute" and not s["torch_elementwise"]
        fit = {"layer_overhead": ["layer overhead"], "compute": ["element-wise factor" if s["torch_elementwise"]
                                                                  else "head-dim 64 rate"]}.get(s["fit"], [])
        if kernels_run and own(s).kernel_head_dim_rate:
            fit = []  # the head-dim-64 rates are the kernels' measured ones (sim_hd64): nothing fits on it
        note = "; ".join(n for n in (s.get("note"), "the same configuration is measured twice"
                                      if s["torch_elementwise"] else "") if n)
        cases.append(_case(s["name"], s["measured"], pred, loo_pred, s["world"], s["file"], fit, note, era=s["era"]))
        if s["measured_mem_gib"]:
            memory.append({"name": s["name"], "measured_gib": round(s["measured_mem_gib"], 3),
                           "predicted_gib": round(mem, 3), "rel_err": round(_rel(mem, s["measured_mem_gib"]), 4)})

    excluded += maxlen_exclusions(found) + diagnostic_exclusions(root)
    from seqpar.sim.configs import plain_config
    from seqpar.sim.step import memory_per_rank

    peaks, superseded = memory_peak_samples(root)
    excluded += superseded
    for s in maxlen_memory_samples(found) + peaks:
        # runs before the split (235a598) never allocated its scratch; since cec5aa8 the estimate knows
        # that rows of one document (these runs' rows) never do, so the flag changes nothing for them
        split = s["era"] >= era_since("235a598")
        mem = memory_per_rank(plain_config(s["overrides"]), s["world"], split=split)["total_gib"]
        memory.append({"name": s["name"], "measured_gib": round(s["measured_mem_gib"], 3),
                       "predicted_gib": round(mem, 3), "rel_err": round(_rel(mem, s["measured_mem_gib"]), 4)})
    within = [c for c in cases if abs(c["rel_err"]) <= GOAL]
    eras = {e: calibrate(root, era=e).as_dict() for e in sorted({c["era"] for c in cases})}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cluster": cluster.name, "goal_rel_err": GOAL,
            "summary": {"cases": len(cases), "within_goal": len(within),
                        "within_goal_loo": sum(abs(c["loo_rel_err"]) <= GOAL for c in cases),
                        "max_abs_rel_err": max((abs(c["rel_err"]) for c in cases), default=None),
                        "disagg": ("no GPU disaggregation benchmark committed yet: nothing to compare"
                                   if not found["disagg"] else f"{len(found['disagg'])} file(s)")},
            "cases": cases, "memory": memory, "excluded": excluded, "calibration": full.as_dict(),
            "code_changes": [{"since": since, "what": what} for since, what in CODE_CHANGES],
            "calibration_by_era": eras}


def table(result: dict) -> str:
    lines = [f"{'case':<72} {'measured':>10} {'predicted':>10} {'err':>7} {'LOO err':>8}  in-sample"]
    for c in result["cases"]:
        lines.append(f"{c['name']:<72} {c['measured_s'] * 1e3:9.2f}ms {c['predicted_s'] * 1e3:9.2f}ms "
                     f"{c['rel_err']:+7.1%} {c['loo_rel_err']:+8.1%}  {', '.join(c['in_sample']) or '-'}")
    for m in result["memory"]:
        lines.append(f"memory {m['name']:<65} {m['measured_gib']:8.2f}GiB {m['predicted_gib']:8.2f}GiB {m['rel_err']:+7.1%}")
    for e in result["excluded"]:
        timed = (f" (measured {e['measured_s'] * 1e3:.2f} ms, predicted {e['predicted_s'] * 1e3:.2f} ms)"
                 if e.get("predicted_s") else "")
        lines.append(f"excluded: {e['name']}{timed}: {e['reason']}")
    s = result["summary"]
    lines.append(f"{s['within_goal']}/{s['cases']} cases within {result['goal_rel_err']:.0%} "
                 f"({s['within_goal_loo']}/{s['cases']} leave-one-group-out)")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The cases as docs/sim.md's Validation table (run: the run folder without its date, and the lane
    for files below it)."""
    from pathlib import Path

    from seqpar.sim.eras import run_key

    lines = ["| case | run | era | GPUs | measured | predicted | error | leave-one-group-out | fitted on it |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        run = str(Path(run_key(c["file"])).parent)[len("2026-11-26-"):]
        lines.append(f"| {c['name']} | {run} | {c['era']} | {c['world']} | {c['measured_s'] * 1e3:.2f} ms | "
                     f"{c['predicted_s'] * 1e3:.2f} ms | {c['rel_err']:+.1%} | {c['loo_rel_err']:+.1%} | "
                     f"{', '.join(c['in_sample']) or '-'} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str | None:
    """Predicted against measured, log-log, one point per case (in-sample ones hollow)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cases = result["cases"]
    lo = min(min(c["measured_s"], c["predicted_s"]) for c in cases) / 1.5
    hi = max(max(c["measured_s"], c["predicted_s"]) for c in cases) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.2, label="within 10%")
    held = [c for c in cases if not c["in_sample"]]
    fitted = [c for c in cases if c["in_sample"]]
    ax.scatter([c["measured_s"] for c in fitted], [c["predicted_s"] for c in fitted], marker="o",
               facecolors="none", edgecolors="C0", label="a fit used the case")
    ax.scatter([c["measured_s"] for c in held], [c["predicted_s"] for c in held], marker="s", color="C1",
               label="held out of every fit")
    ax.scatter([c["measured_s"] for c in fitted], [c["loo_predicted_s"] for c in fitted], marker="x", color="C3",
               label="fitted ones, leave-one-group-out")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (s)")
    ax.set_ylabel("predicted (s)")
    ax.set_title("seqpar.sim validate (H100 and H200 runs, docs/benchmarks)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(out: str | None) -> int:
    result = validate()
    print(table(result))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        png = plot(result, os.path.splitext(out)[0] + ".png")
        if png:
            print("wrote", png)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return 0
