"""Fit the simulator's constants on the project's own measurements (docs/benchmarks/*/).

Each constant is fitted by code from the JSON rows, never typed in; a missing file leaves the
cluster-derived default and says so in `Calibration.sources`. `exclude` drops named groups of rows
(validation predicts each case from a fit without its own group: leave-one-group-out).

| constant | rows it is fitted on |
| --- | --- |
| attention kernel (rate, per_token, per_call), per family | ring bench: single-GPU dense and packed rows, ring compute-only rows |
| linear attention tokens/s | kernels bench: seqpar lightning rows (median) |
| LASP-2 extra per layer (fixed, per token) | lasp bench: lasp2 (what lasp2_attention runs) minus the kernel on the local half minus the gather |
| overlap tax | ring bench: exposed comm (ring - compute-only) over the modelled transfers |
| intra-node alpha/beta per collective | comm bench (`python -m seqpar.bench comm`), when present |
| runtime extra per local token (disagg, per-document CP); packed ring per document piece and per folded row | disagg bench case means; ring bench packed rows |
| Triton flash over torch's varlen flash on packed rows (time ratio) | kernels bench: flash section, packed rows |
| layer host overhead | the default job (tiny model, launch-bound) end to end |
| element-wise factor | llama_1b 16k end to end on one GPU |
| attention speed at head dim 64 relative to 128, per kernel | sim_hd64 bench (`fit_head_dim`); without it, the llama_1b 16k run with seqpar's kernels end to end (one rate) |
"""
from __future__ import annotations

import glob
import itertools
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from seqpar.sim.comm import LinkFit
from seqpar.sim.compute import HEAD_DIM_RATE, REF_HD, AttnFit
from seqpar.sim.measurements import (disagg_samples, e2e_samples, folder_health, lasp_samples, load_benchmarks,
                                     ring_samples)

@dataclass
class Calibration:
    attn: dict[str, AttnFit]
    linear_tokens_per_s: float
    linear_ref_hdd: int
    lasp_call_s: float
    lasp_token_s: float
    overlap_tax: float
    elementwise_factor: float
    layer_overhead_s: float
    runtime_token_s: dict[str, float] = field(default_factory=dict)  # see attention_cost.runtime_extra
    ring_piece_s: float = 0.0  # see attention_cost.ring_pieces
    ring_fold_row_s: float = 0.0  # see attention_cost.ring_fold_rows (per row at 32 heads x 128)
    ring_gqa_slowdown: float = 0.0  # packed ring with fewer K/V than query heads: extra share of its compute
    fused_norm_eff: float = 1.0  # Triton RMSNorm's share of HBM copy bandwidth (slowest of fwd, bwd)
    fused_rope_eff: float = 1.0  # Triton RoPE's
    fused_ce_ratio: float = 1.0  # fused linear + CE time over the unfused F.linear + F.cross_entropy
    # which kernel packed (varlen) calls run: "triton" (dispatch's choice since TRITON_FASTER named
    # them) or "flash" (torch's varlen flash: runs before that, and the ring bench's forced families)
    packed_kernel: str = "triton"
    # whether calls with bounds and an lse (ring blocks, disagg servers) run the split's lse form:
    # None by era (from cec5aa8, attention_cost.lse_split_applies), else what the run recorded
    lse_split: bool | None = None
    # whether that lse form also sends causal tasks over a prefix to cuDNN: None by era (from 9a4c89d)
    lse_prefix: bool | None = None
    triton_packed_ratio: float = 1.0  # Triton flash time over torch's varlen flash on packed rows
    triton_dense_ratio: float = 1.0  # Triton flash time over torch's (SDPA) flash on dense causal rows
    comm: LinkFit = field(default_factory=LinkFit)
    sources: dict[str, str] = field(default_factory=dict)
    era: int = 0  # the code era these constants describe (eras.CODE_CHANGES)
    # attention kernel speed per head dim relative to 128 (compute.HEAD_DIM_RATE; 64 fitted end to end
    # where no kernel row at 64 was measured)
    head_dim_rate: dict = field(default_factory=lambda: dict(HEAD_DIM_RATE))
    # the same per kernel ("cudnn", "flash", "triton") from the sim_hd64 bench; overrides head_dim_rate
    # for that kernel's calls (attention_cost.attn_seconds)
    kernel_head_dim_rate: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"attention": {k: v.as_dict() for k, v in self.attn.items()},
                "linear_Mtok_s_at_H32_D128": round(self.linear_tokens_per_s * self.linear_ref_hdd / (32 * 128 * 128) / 1e6, 3),
                "lasp_extra": {"per_layer_us": round(self.lasp_call_s * 1e6, 1),
                               "per_token_ns": round(self.lasp_token_s * 1e9, 3)},
                "overlap_tax": round(self.overlap_tax, 3), "elementwise_factor": round(self.elementwise_factor, 3),
                "layer_overhead_us": round(self.layer_overhead_s * 1e6, 1),
                "attention_rate_by_head_dim": {str(k): round(v, 3) for k, v in self.head_dim_rate.items()},
                "attention_rate_by_head_dim_per_kernel": {kern: {str(k): round(v, 3) for k, v in r.items()}
                                                          for kern, r in self.kernel_head_dim_rate.items()},
                "runtime_ns_per_local_token": {k: round(v * 1e9, 2) for k, v in self.runtime_token_s.items()},
                "ring_per_document_piece_us": round(self.ring_piece_s * 1e6, 2),
                "ring_per_folded_row_ns": round(self.ring_fold_row_s * 1e9, 3),
                "ring_packed_gqa_slowdown": round(self.ring_gqa_slowdown, 4),
                "triton_packed_time_ratio": round(self.triton_packed_ratio, 4),
                "triton_dense_time_ratio": round(self.triton_dense_ratio, 4),
                "fused_kernels": {"rms_norm_share_of_hbm": self.fused_norm_eff, "rope_share_of_hbm": self.fused_rope_eff,
                                  "ce_time_vs_unfused": self.fused_ce_ratio},
                "comm_intra_node": {op: {"latency_us": round(a * 1e6, 2), "GB_s": round(bw / 1e9, 1)}
                                    for op, (a, bw) in self.comm.ops.items()},
                "era": self.era, "sources": self.sources}


def default_calibration() -> Calibration:
    """Before any measurement: FlashAttention-2 / cuDNN at ANCHORS-like rates, no overheads."""
    return Calibration(attn={"cudnn": AttnFit(550e12, 0.0, 0.0), "flash": AttnFit(320e12, 0.0, 0.0)},
                       linear_tokens_per_s=12e6, linear_ref_hdd=32 * 128 * 128, lasp_call_s=0.0, lasp_token_s=0.0,
                       overlap_tax=0.0, elementwise_factor=1.0, layer_overhead_s=0.0,
                       sources={"all": "defaults (no benchmark JSON found)"})


def sample_features(sample) -> list[tuple[str, tuple]]:
    """(family of each call, (flops, rows, calls)) of a single or ring-compute sample (busiest rank per step)."""
    from seqpar.sim.attention_cost import _single_call, ring_step_calls
    from seqpar.sim.compute import attn_features

    H, D = sample["H"], sample["D"]
    fam = lambda call: "flash" if call.is_varlen or call.with_bounds else sample["family"]
    if sample["kind"] == "single":
        call = _single_call(sample["bounds"])
        return [(fam(call), attn_features(call, H, D))]
    feats = []
    for per_rank in ring_step_calls(tuple(sample["bounds"]), sample["world"]):
        # dense zigzag rows: every rank the same work; keep rank 0's calls
        feats += [(fam(c), attn_features(c, H, D)) for c in per_rank[0] if c]
    return feats


def _nnls_relative(rows: list[tuple[list[float], float]]) -> np.ndarray:
    """Non-negative least squares on relative residuals, by trying every support (3 unknowns)."""
    A = np.array([[x / y for x in xs] for xs, y in rows])
    b = np.ones(len(rows))
    best, best_err = None, float("inf")
    n = A.shape[1]
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            sub = A[:, support]
            sol, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (sol < 0).any():
                continue
            x = np.zeros(n)
            x[list(support)] = sol
            err = float(((A @ x - b) ** 2).sum())
            if err < best_err - 1e-12:
                best, best_err = x, err
    return best


def fit_attention(samples, exclude=()) -> dict[str, AttnFit]:
    """Per family: coefficients of (1/rate, per_token, per_call) from single and ring-compute samples."""
    fits = {}
    usable = [s for s in samples if s["kind"] in ("single", "ring_compute") and s["group"] not in exclude
              and s.get("layout", "zigzag") == "zigzag"]  # doc_zigzag rows are held out (validation only)
    for family in ("flash", "cudnn"):
        rows = []
        for s in usable:
            feats = sample_features(s)
            if not any(f == family for f, _ in feats):
                continue
            own = [np.array(x) for f, x in feats if f == family]
            other = sum((np.array(x) for f, x in feats if f != family), np.zeros(3))
            measured = s["measured"]
            if other.any():
                if "flash" not in fits:
                    continue
                fl = fits["flash"]
                measured -= other[0] / fl.rate + other[1] * fl.per_token + other[2] * fl.per_call
            rows.append((list(sum(own)), measured))
        if not rows:
            continue
        x = _nnls_relative(rows)
        if x is None or x[0] <= 0:
            continue
        fits[family] = AttnFit(rate=1 / x[0], per_token=float(x[1]), per_call=float(x[2]))
    return fits


# the lightning kernel's rows of fewer tokens are launch-bound, which a tokens/s rate does not describe:
# one H200 at B=1 (2026-11-26-4gpu-7th call 2) ran 4k and 8k tokens at 3.3 and 7.4 Mtok/s, 16k-128k at 11.1-13.1
LINEAR_MIN_TOKENS = 16384


def _lightning_rows(data) -> list[dict]:
    """A kernels bench's rows of seqpar's lightning kernel (its default segments) that `fit_linear` uses."""
    rows = data.get("lightning", {}).get("rows", []) if isinstance(data.get("lightning"), dict) else []
    return [r for r in rows if r.get("kernel") == "seqpar" and "fwdbwd_Mtok_s" in r
            and r.get("B", 1) * r.get("S", LINEAR_MIN_TOKENS) >= LINEAR_MIN_TOKENS]


def fit_linear(found) -> tuple[float, int] | None:
    """(median fwd+bwd tokens/s scaled to the first row's H x D x D, that H x D x D) of the lightning rows."""
    rates = []
    for _, data in found["kernels"]:
        for row in _lightning_rows(data):
            rates.append((row["fwdbwd_Mtok_s"] * 1e6, row["H"] * row["D"] * row["D"]))
    if not rates:
        return None
    hdd = rates[0][1]
    return statistics.median(r * h / hdd for r, h in rates), hdd


def fit_triton_packed(found, layout: str = "packed") -> tuple[float, str] | None:
    """(median time ratio, file) of seqpar's Triton flash over torch's flash, fwd+bwd, on the
    kernels bench's rows of `layout`: packed (against varlen flash, the same documents) or dense
    (against SDPA's flash, one causal document)."""
    other = {"packed": "torch_varlen_flash", "dense": "sdpa_flash"}[layout]
    ratios, files = [], []
    for path, data in found["kernels"]:
        rows = data.get("flash", {}).get("rows", []) if isinstance(data.get("flash"), dict) else []
        packed = {(r["kernel"], r["S"], r.get("n_docs")): r for r in rows if r.get("layout") == layout}
        for (kernel, S, docs), r in packed.items():
            torch_row = packed.get((other, S, docs))
            if kernel == "seqpar_triton" and torch_row and r.get("fwdbwd_ms") and torch_row.get("fwdbwd_ms"):
                ratios.append(r["fwdbwd_ms"] / torch_row["fwdbwd_ms"])
                files.append(path)
    return (statistics.median(ratios), ", ".join(sorted(set(files)))) if ratios else None


# the sim_hd64 bench's kernel names -> the simulator's kernels: "sdpa" is what kernels/sdpa.py runs for
# a dense row (cuDNN first), "sdpa_flash" torch's FA2, "triton" seqpar's kernel ("dispatch": whichever
# the dispatcher picks, which the model decides itself)
HD_BENCH_KERNELS = {"sdpa": "cudnn", "sdpa_flash": "flash", "triton": "triton"}


def fit_head_dim(found) -> tuple[dict[str, dict[int, float]], str] | None:
    """({kernel: {head_dim: fwd+bwd TFLOP/s over head dim 128's}}, files) from the sim_hd64 rows: per
    kernel, the median over the shapes (nq, nk) measured at both head dims of the ratio of their
    TFLOP/s. Kernel-aware, not length-aware: on the 2026-11-26 H200 rows (16k, 32k, 8k queries
    against 16k/32k keys) the kernels differ (cuDNN 0.78-0.81, FA2 0.86-0.88, Triton 0.76-0.83) while
    no kernel's ratio moves one way with length (cuDNN falls 16k -> 32k, FA2 and Triton rise, Triton's
    8k-query rows sit between), each within 6% of its median. The head-dim-64 rows have 8 K/V heads
    for 32 queries (llama_1b's and hybrid_1b's GQA), the 128 ones 32: the ratio carries GQA's share."""
    by_kernel, files = {}, set()
    for path, data in found.get("sim_hd64", []):
        rows = [r for r in data.get("rows", []) if r.get("fwdbwd_tflops") and r.get("kernel") in HD_BENCH_KERNELS]
        ref = {(r["kernel"], r["nq"], r["nk"]): r["fwdbwd_tflops"] for r in rows if r["D"] == 128}
        for r in rows:
            base = ref.get((r["kernel"], r["nq"], r["nk"]))
            if r["D"] != 128 and base:
                by_kernel.setdefault(HD_BENCH_KERNELS[r["kernel"]], {}).setdefault(r["D"], []).append(
                    r["fwdbwd_tflops"] / base)
                files.add(path)
    if not by_kernel:
        return None
    rates = {k: {d: statistics.median(v) for d, v in per.items()} for k, per in by_kernel.items()}
    return rates, ", ".join(sorted(files))


def fit_lasp(samples, calib, cluster, exclude=()) -> tuple[float, float] | None:
    """(fixed s, s per local token) of LASP-2's passes beyond the kernel, from the `lasp2` rows (the
    schedule lasp2_attention runs); rows of one length only: the fixed part only."""
    from seqpar.sim.attention_cost import lasp_layer
    from seqpar.sim.comm import placed

    pts = []
    for s in samples:
        if s["method"] != "lasp2" or s["group"] in exclude or s.get("not_comparable"):
            continue
        base = replace(calib, lasp_call_s=0.0, lasp_token_s=0.0)
        pred, _, _ = lasp_layer(base, cluster, [(0, s["tokens"])], s["world"], s["H"], s["D"],
                                placed(s["world"], 1, cluster.gpus_per_node))
        pts.append((s["tokens"] / s["world"], s["measured"] - pred))
    if not pts:
        return None
    if len({x for x, _ in pts}) == 1:  # one length (maybe measured twice): the fixed part only
        return max(0.0, statistics.mean(y for _, y in pts)), 0.0
    x = np.array([p[0] for p in pts]); y = np.array([p[1] for p in pts])
    slope, icept = np.polyfit(x, y, 1)
    if icept < 0:
        return 0.0, float(max(0.0, (x @ y) / (x @ x)))
    return float(icept), float(max(0.0, slope))


def fit_overlap_tax(samples, calib, cluster, exclude=()) -> float | None:
    """Median over dense ring rows of exposed comm / modelled transfers (both ranks busy alike)."""
    from seqpar.sim.attention_cost import ring_layer
    from seqpar.sim.comm import placed

    by_key = {}
    for s in samples:
        if s["group"] in exclude or s["kind"] not in ("ring", "ring_compute") or len(s["bounds"]) > 2:
            continue
        by_key.setdefault((s["file"], s["S"], s["family"]), {})[s["kind"]] = s
    taxes = []
    for (_, S, fam), pair in by_key.items():
        if len(pair) < 2:
            continue
        s = pair["ring"]
        t0 = replace(calib, overlap_tax=0.0)
        group = placed(s["world"], 1, cluster.gpus_per_node)
        total, _, compute = ring_layer(t0, cluster, [s["bounds"]], s["world"], s["H"], s["H"], s["D"], group, fam)
        t1 = replace(calib, overlap_tax=1.0)
        total1, _, _ = ring_layer(t1, cluster, [s["bounds"]], s["world"], s["H"], s["H"], s["D"], group, fam)
        hidden = total1 - total  # the sum of min(compute, comm) over steps
        if hidden > 0:
            taxes.append(max(0.0, (pair["ring"]["measured"] - pair["ring_compute"]["measured"]) / hidden))
    return statistics.median(taxes) if taxes else None


def _scales(points) -> np.ndarray:
    """c >= 0 minimising the relative error of base + features . c against measured, over
    (features, measured, base) points (every support tried: a handful of unknowns)."""
    A = np.array([[x / m for x in xs] for xs, m, _ in points])
    b = np.array([(m - base) / m for _, m, base in points])
    best, best_err = np.zeros(A.shape[1]), float((b ** 2).sum())
    for k in range(1, A.shape[1] + 1):
        for support in itertools.combinations(range(A.shape[1]), k):
            sol, *_ = np.linalg.lstsq(A[:, support], b, rcond=None)
            x = np.zeros(A.shape[1])
            x[list(support)] = sol
            err = float(((A @ x - b) ** 2).sum())
            if (sol >= 0).all() and err < best_err - 1e-15:
                best, best_err = x, err
    return best


def _one_scale(points) -> float:
    return float(_scales([((x,), m, b) for x, m, b in points])[0])


def _ring_compute(rows, s, calib, cluster) -> float:
    """Mean modelled compute seconds of the ring on a disagg sample's batches."""
    from seqpar.sim.attention_cost import ring_layer
    from seqpar.sim.comm import placed

    group = placed(s["world"], 1, cluster.gpus_per_node)
    return sum(ring_layer(calib, cluster, [b], s["world"], s["H"], s["Hkv"], s["D"], group)[2] for b in rows) / len(rows)


def fit_runtime(ring, disagg, calib, cluster, exclude=(), ring_disagg=None) -> tuple[dict[str, float], float | None]:
    """({runtime: s per local token}, (s per ring document piece, GQA slowdown, s per folded row)) beyond the modelled
    kernels and transfers: `disagg` on the disagg benchmark's disagg rows (with and without ping-pong),
    `per_doc_cp` on its per-document CP rows (the same runtime serving its own chunks), the ring's
    per-piece cost (attention_cost.ring_pieces) and the packed GQA rows' extra share of compute on the
    packed ring rows of the ring benchmark (MHA) and the disagg benchmark's ring rows (GQA 32/8) of
    `ring_disagg` (default `disagg`). Fitted on each case's mean over its batches, every extra at zero."""
    from seqpar.sim.attention_cost import ring_fold_rows, ring_layer, ring_pieces
    from seqpar.sim.cases import RUNTIME_OF, disagg_case
    from seqpar.sim.comm import placed

    base = replace(calib, runtime_token_s={}, ring_piece_s=0.0, ring_gqa_slowdown=0.0, ring_fold_row_s=0.0)
    points = {"disagg": [], "per_doc_cp": []}
    ring_points = []
    ring_disagg = disagg if ring_disagg is None else ring_disagg
    for s in disagg + [x for x in ring_disagg if x not in disagg]:
        if s["group"] in exclude:
            continue
        for method, runtime in RUNTIME_OF.items():
            if (runtime in points and s not in disagg) or (runtime not in points and s not in ring_disagg):
                continue
            case = disagg_case(method, s, base, cluster)
            if case and runtime in points:
                measured, pred, local, _ = case
                points[runtime].append((local, measured, pred))
            elif case:
                rows = [b for b, r in s["batches"] if f"{method}_ms" in r]
                pieces = sum(ring_pieces(tuple(b), s["world"]) for b in rows) / len(rows)
                folds = sum(ring_fold_rows(tuple(b), s["world"]) for b in rows) / len(rows) * s["H"] * s["D"] / REF_HD
                own = replace(base, packed_kernel=s.get("packed_kernel", "triton"), lse_split=s.get("lse_split"),
                              lse_prefix=s.get("lse_prefix"))
                gqa = _ring_compute(rows, s, own, cluster) if s["Hkv"] < s["H"] else 0.0
                ring_points.append(((pieces, gqa, folds), case[0], case[1]))
    for s in ring:
        if s["group"] in exclude or s["kind"] != "ring" or len(s["bounds"]) <= 2:
            continue
        layout = s.get("layout", "zigzag")
        group = placed(s["world"], 1, cluster.gpus_per_node)
        pred = ring_layer(replace(base, packed_kernel="flash"), cluster, [s["bounds"]], s["world"], s["H"], s["H"], s["D"], group, s["family"],
                          layout=layout)[0]
        folds = ring_fold_rows(tuple(s["bounds"]), s["world"], layout) * s["H"] * s["D"] / REF_HD
        ring_points.append(((ring_pieces(tuple(s["bounds"]), s["world"], layout), 0.0, folds), s["measured"], pred))
    per_token = {name: _one_scale(pts) for name, pts in points.items() if pts}
    return per_token, (tuple(_scales(ring_points)) if ring_points else None)


def fit_fused(root, era: int | None = None) -> tuple[float, float, float, str] | None:
    """(RMSNorm share of HBM copy bandwidth, RoPE's, fused CE time ratio, file) from the kernels
    benchmark's fused section summary (`seqpar.bench kernels --only fused`: a JSON file, or the
    summary line its log prints when the JSON did not come back)."""
    import json

    from seqpar.sim.measurements import bench_dir

    from seqpar.sim.eras import era_of

    root = Path(root or bench_dir())
    for path in sorted(glob.glob(str(root / "*" / "fused*.json")) + glob.glob(str(root / "*" / "fused*.log"))):
        if era is not None and era_of(path) != era:
            continue
        for line in Path(path).read_text().splitlines():
            if not line.startswith("{") or "ce_vs_unfused" not in line:
                continue
            try:
                summary = json.loads(line)
            except json.JSONDecodeError:
                continue
            ce = [v["time_ratio"] for k, v in summary["ce_vs_unfused"].items() if "triton" in k and "4096" in k]
            if ce:
                return (summary["rms_norm_min_pct_copy"] / 100, summary["rope_min_pct_copy"] / 100, ce[0], path)
    return None


def fit_comm(found) -> LinkFit:
    """Intra-node (latency, bandwidth) per collective from `seqpar.bench comm` rows: least squares of
    time = latency_terms * a + moved_bytes / bw over the message sizes."""
    from seqpar.sim.comm import OPS

    fit = LinkFit()
    for path, data in found["comm"]:
        if "NVIDIA" not in str(data.get("device", "")):
            continue  # the gloo smoke form's CPU figures say nothing about NVLink
        n = data.get("world", 2)
        for op in OPS:
            rows = [r for r in data.get("rows", []) if r.get("op") == op and r.get("time_s", 0) > 0]
            if len(rows) < 2:
                continue
            steps = {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1}.get(op, 1)
            frac = {"all_reduce": 2 * (n - 1) / n, "send_recv": 1.0}.get(op, (n - 1) / n)
            A = np.array([[steps / r["time_s"], frac * r["bytes"] / r["time_s"]] for r in rows])
            sol = _nnls_relative([(list(A[i] * rows[i]["time_s"]), rows[i]["time_s"]) for i in range(len(rows))])
            if sol is None or sol[1] <= 0:
                continue
            fit.ops[op] = (float(sol[0]), float(1 / sol[1]))
        fit.source = path
    return fit


def fit_e2e(samples, calib, cluster, exclude=()) -> Calibration:
    """Layer host overhead on the launch-bound run (the GPU part of its layers is far below it),
    then the element-wise factor on the compute-bound eager runs and the attention kernel's speed at
    head dim 64 on the compute-bound run with seqpar's kernels where no sim_hd64 bench measured it
    per kernel (`calib.kernel_head_dim_rate`; with it that run is held out): the two share the
    model's attention, so they are solved in turn until they settle, each by bisection on the
    model. Runs with no `fit` role (E2E_RUNS) are held out."""
    from seqpar.sim.configs import plain_config
    from seqpar.sim.step import predict_step

    usable = [s for s in samples if not s["unhealthy"] and not s.get("contaminated") and s["group"] not in exclude]
    launch = [s for s in usable if s.get("fit") == "layer_overhead"]
    compute = [s for s in usable if s.get("fit") == "compute" and s["torch_elementwise"]]
    kernels = [s for s in usable if s.get("fit") == "compute" and not s["torch_elementwise"]]

    def solve(sample, key, lo, hi):
        cfg = plain_config(sample["overrides"])
        def f(v):
            c = replace(calib, head_dim_rate={**calib.head_dim_rate, 64: v}) if key == "head_dim_64" else \
                replace(calib, **{key: v})
            c = replace(c, packed_kernel=sample.get("packed_kernel", "triton"))  # the run's dispatcher's choice
            return predict_step(cfg, sample["world"], cluster, c,
                                torch_elementwise=sample["torch_elementwise"])["step_s"] - sample["measured"]
        # the step time falls as the head-dim rate rises and rises with the other two constants;
        # it is close to linear in each (in 1/rate for the rate), so regula falsi (Illinois) settles
        # in a few steps where bisection takes thirty
        sign = -1 if key == "head_dim_64" else 1
        g = lambda v: sign * f(v)
        g_lo, g_hi = g(lo), g(hi)
        if g_lo > 0 or g_hi < 0:
            return lo if g_lo > 0 else hi
        side = 0
        for _ in range(40):
            mid = hi - g_hi * (hi - lo) / (g_hi - g_lo) if g_hi != g_lo else (lo + hi) / 2
            g_mid = g(mid)
            if abs(g_mid) <= 1e-6 * sample["measured"]:
                return mid
            if g_mid < 0:
                lo, g_lo = mid, g_mid
                g_hi, side = (g_hi / 2, 1) if side == 1 else (g_hi, 1)
            else:
                hi, g_hi = mid, g_mid
                g_lo, side = (g_lo / 2, -1) if side == -1 else (g_lo, -1)
        return mid

    if launch:
        calib = replace(calib, layer_overhead_s=statistics.median(solve(s, "layer_overhead_s", 0.0, 1.0) for s in launch))
        calib.sources["layer_overhead_s"] = ", ".join(s["file"] for s in launch)
    # one end-to-end rate for every kernel could not fit 16k and 256k steps together (it absorbed
    # what is not attention); measured per-kernel rates replace it, leaving the eager factor alone
    fit_rate = bool(kernels) and not calib.kernel_head_dim_rate
    for _ in range(4 if compute and fit_rate else 1):
        if compute:
            calib = replace(calib, elementwise_factor=statistics.median(solve(s, "elementwise_factor", 0.0, 200.0)
                                                                        for s in compute))
            calib.sources["elementwise_factor"] = ", ".join(s["file"] for s in compute)
        if fit_rate:
            rate = statistics.median(solve(s, "head_dim_64", 0.2, 1.5) for s in kernels)
            calib = replace(calib, head_dim_rate={**calib.head_dim_rate, 64: rate})
            calib.sources["head_dim_64_rate"] = ", ".join(s["file"] for s in kernels)
    return calib


_CACHE: dict = {}


def calibrate(root: Path | None = None, exclude: tuple[str, ...] = (), cluster=None, era: int | None = None) -> Calibration:
    """Every constant from the benchmark JSONs under `root` (default docs/benchmarks), fitted on
    the machine they were measured on (the h100_8x400g preset's links), without the `exclude` groups.
    `era` (default: the latest, today's code): fit on that code era's runs only
    (`eras.CODE_CHANGES`), the ring and kernels benchmarks on those of every era that shares
    its ring and kernel code (`eras.kernel_eras`); a constant the era has no runs for keeps
    the previous era's value."""
    from seqpar.sim.cluster import load_cluster
    from seqpar.sim.eras import CODE_CHANGES, in_era, kernel_eras, lightning_eras

    era = len(CODE_CHANGES) if era is None else era
    key = (str(root), tuple(sorted(exclude)), era)
    if key in _CACHE:
        return _CACHE[key]
    cluster = cluster or load_cluster("h100_8x400g")
    everything = load_benchmarks(root)
    found = in_era(everything, era)
    # the ring and kernels benchmarks of every era with this era's ring and kernel code (a change of the
    # disagg schedule alone starts an era for the disagg runtime's constants, not for these)
    same_kernels = in_era(everything, kernel_eras(era))
    calib = default_calibration() if era == 0 else calibrate(root, exclude, cluster, era - 1)
    calib = replace(calib, attn=dict(calib.attn), runtime_token_s=dict(calib.runtime_token_s), era=era,
                    sources={} if era == 0 else dict(calib.sources))
    comm = fit_comm(found)
    if comm.ops:
        calib.comm = comm
        calib.sources["comm"] = comm.source
    triton = fit_triton_packed(same_kernels)
    if triton:
        calib.triton_packed_ratio, calib.sources["triton_packed"] = triton
    triton = fit_triton_packed(same_kernels, "dense")
    if triton:
        calib.triton_dense_ratio, calib.sources["triton_dense"] = triton
    ring = [s for s in ring_samples(same_kernels) if not folder_health(s["file"])]
    attn = fit_attention(ring, exclude)
    if attn:
        calib.attn = {**calib.attn, **attn}
        calib.sources["attention"] = ", ".join(sorted({s["file"] for s in ring}))
    lightning = in_era(everything, lightning_eras(era))  # the rows of this era's lightning kernel
    lin = fit_linear(lightning)
    if lin:
        calib.linear_tokens_per_s, calib.linear_ref_hdd = lin
        calib.sources["linear"] = ", ".join(p for p, d in lightning["kernels"] if _lightning_rows(d))
    tax = fit_overlap_tax(ring, calib, cluster, exclude)
    if tax is not None:
        calib.overlap_tax = tax
    # the disagg runtime's extras from this era's disagg rows; the packed ring's from the ring rows (of the
    # ring bench and of the disagg bench) of every era with this era's ring code
    runtime, piece = fit_runtime(ring, disagg_samples(found), calib, cluster, exclude,
                                 ring_disagg=disagg_samples(same_kernels))
    if runtime or piece is not None:
        calib.runtime_token_s.update(runtime)
        if piece is not None:
            calib.ring_piece_s, calib.ring_gqa_slowdown, calib.ring_fold_row_s = piece
        calib.sources["runtime"] = ", ".join(sorted({p for p, _ in same_kernels["disagg"]} | {s["file"] for s in ring}))
    lasp = fit_lasp(lasp_samples(found), calib, cluster, exclude)
    if lasp:
        calib.lasp_call_s, calib.lasp_token_s = lasp
        calib.sources["lasp"] = ", ".join(p for p, _ in found["lasp"])
    fused = fit_fused(root, era)
    if fused:
        calib.fused_norm_eff, calib.fused_rope_eff, calib.fused_ce_ratio, calib.sources["fused_kernels"] = fused
    # kernel speeds at head dim 64 from every era's files: they are torch's cuDNN and FA2 and the Triton
    # kernel on their own, whose head-dim ratio no runtime change of CODE_CHANGES touches
    head_dim = fit_head_dim(everything)
    if head_dim:
        calib.kernel_head_dim_rate, calib.sources["head_dim_rate"] = head_dim
    calib = fit_e2e(e2e_samples(found), calib, cluster, exclude)
    for k in ("attention", "linear", "lasp", "layer_overhead_s", "elementwise_factor"):
        calib.sources.setdefault(k, "default (no benchmark JSON found)")
    repo = str(Path(__file__).resolve().parents[2]) + os.sep
    calib.sources = {k: v.replace(repo, "") for k, v in calib.sources.items()}
    _CACHE[key] = calib
    return calib
