"""The measurements under docs/benchmarks/*/, read into samples the simulator can predict.

Each kind of benchmark JSON (ring, lasp, kernels, comm, disagg) and each end-to-end metrics file
becomes a list of samples: what was run (shapes, document bounds, layout) and what it took. Rows
that cannot be reproduced exactly (documents redrawn differently, a card that ran below its usual
speed) are dropped or flagged here, so that neither the fits nor the validation use them.
"""
from __future__ import annotations

import glob
import itertools
import json
import os
import re
import statistics
from pathlib import Path

from seqpar.sim.eras import era_of, packed_kernel_of, run_date, run_folder, run_key


# ANCHORS.md's plain-PyTorch llama 1.1B at 16k on a healthy H100, eager: what tells a throttled
# card from a healthy one when the anchor ran in the same call (reference value, not a fit)
ANCHOR_E2E_EAGER_TOKENS_S = 40989


def bench_dir() -> Path:
    return Path(os.environ.get("SEQPAR_BENCH_DIR", Path(__file__).resolve().parents[2] / "docs" / "benchmarks"))


# ---------------------------------------------------------------- reading the benchmark folders

_UNREADABLE = object()
_PARSED: dict = {}


def _parsed(path: str, lines: bool = False):
    """A file's JSON (or its JSONL lines that parse), read once per version of the file: validate's
    leave-one-out fits load the whole folder some 300 times. Callers only read what it returns.
    An unreadable file: _UNREADABLE (no lines: [])."""
    unreadable = [] if lines else _UNREADABLE
    try:
        st = os.stat(path)
    except OSError:
        return unreadable
    key = (path, lines, st.st_mtime_ns, st.st_size)
    if key not in _PARSED:
        try:
            text = Path(path).read_text()
            if lines:
                rows = []
                for line in text.splitlines():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
                _PARSED[key] = rows
            else:
                _PARSED[key] = json.loads(text)
        except (OSError, json.JSONDecodeError):
            _PARSED[key] = unreadable
    return _PARSED[key]


def load_benchmarks(root: Path | None = None) -> dict[str, list]:
    """Every JSON/JSONL under `root`/*/ by kind: ring, lasp, kernels, comm, disagg, maxlen, e2e (metrics.jsonl)."""
    root = Path(root or bench_dir())
    found = {"ring": [], "lasp": [], "kernels": [], "comm": [], "disagg": [], "maxlen": [], "e2e": [],
             "fourd_2gpu": [], "sim_hd64": []}
    # a run folder's files, or (fifth session on) its lanes' `callN/<lane>/` files below it
    for path in sorted(glob.glob(str(root / "*" / "**" / "*.json"), recursive=True)):
        data = _parsed(path)
        if data is _UNREADABLE:
            continue
        kind = (data.get("benchmark") or data.get("bench")) if isinstance(data, dict) else None
        if kind == "ring" and (data.get("transport", "nccl") != "nccl" or data.get("keep_kv")):
            # the copy engines' transfers (SEQPAR_RING_TRANSPORT=copy) or a backward with no K/V shift
            # (SEQPAR_RING_KEEP_KV=1): the model prices NCCL's ring that moves K/V again
            continue
        if kind in found and not diagnostic(path):
            found[kind].append((path, data))
    for path in sorted(glob.glob(str(root / "*" / "**" / "*metrics.jsonl"), recursive=True)):
        rows = _parsed(path, lines=True)
        if rows:
            found["e2e"].append((path, rows))
    return found


# Files whose timings are a diagnostic, not a measurement: (folder/file) -> why. load_benchmarks skips
# them (no fit, no case); validate lists them under `excluded`.
DIAGNOSTIC_FILES = {
    "2026-11-26-2gpu-10th/call1/hiprio/lasp_hiprio.json": (
        "bench lasp with TORCH_NCCL_HIGH_PRIORITY=1 (NCCL on high-priority streams), an A/B of an environment "
        "variable beside call1/lasp.json: LASP-1 at 64k ran 3.58 ms against 2.87 without it"),
    "2026-11-27-gpu-16th/call2/lasp_tma1.json": (
        "bench lasp with SEQPAR_TMA=1 (the lightning kernels' TMA loads, off by default at that code), an A/B "
        "of an environment variable beside call2/lasp_tma0.json; 195962d made it the default after the call"),
    "2026-11-27-gpu-17th/call4/ring_old_32k.json": (
        "the ring bench at the code before ba5602e (the ring's folds through block_sum_), run after the new "
        "code's rows in the same call as their A/B: its time says the new code's era, its code the one before"),
    "2026-11-27-gpu-17th/call5/old128k.json": (
        "as call4/ring_old_32k.json at 128k (FA2): the code before ba5602e, run beside the new as its A/B"),
    "2026-11-27-gpu-18th/call2/ring_old_flash_32k.json": (
        "the FA2 ring bench at the code before ce206fa (the backward's own blocks as a rectangle and a diagonal, "
        "not one call over the prefix), run beside the new code in the same call as its A/B"),
    "2026-11-26-4xh200-4th/disagg_profiled.json": (
        "the disagg bench under docs/benchmarks/profile_gpu.py to see which kernels run, with untuned kernels "
        "(SEQPAR_FLASH_TUNE=0), one timed iteration and each case profiled: its times are not the benchmark's "
        "(no rebalancing on the 92k-document batch 1009 ms, against 690 ms in disagg_check_128k.json of the "
        "same call)"),
}
# lasp_segments_gpu.sh's runs of the code before c8f2856 (the lightning kernels' segments capped at 2048),
# each beside the new code's on one machine as its A/B: their dates say the new code's era
DIAGNOSTIC_FILES.update({f"2026-11-27-gpu-19th/{name}": (
    "bench lasp at the code before c8f2856 (segments capped at 2048 tokens), run after that commit beside the "
    "new code's rows in the same call as their A/B: its time says the new code's era, its code the one before")
    for name in ("call4/lasp_seg2048_r1.json", "call4/lasp_seg2048_r2.json", "call5/lasp_1m_old.json")})
# lasp_waves_gpu.py's runs with SEG_RULE=waves (the lightning kernels' segment length patched to fill
# whole waves, never the default), each beside the default's runs in the same call as their A/B
DIAGNOSTIC_FILES.update({f"2026-11-27-gpu-20th/call5/lasp_1m_waves_r{r}.json": (
    "bench lasp with the segment length patched by docs/benchmarks/lasp_waves_gpu.py (SEG_RULE=waves), an A/B "
    "beside call5/lasp_1m_default_r*.json; not code that ever was the default") for r in (1, 2)})
# ring_nccl_gpu.sh's runs with NCCL's channels capped (an A/B of environment variables beside
# call3/ring_default.json): NCCL_MAX_NCHANNELS=2 exposed 6.6 ms of transfer at 32k, the others no change
DIAGNOSTIC_FILES.update({f"2026-11-27-gpu-17th/call3/ring_{setting.replace('=', '_')}.json": (
    f"the ring bench with {setting} (NCCL's SM channels capped), an A/B of an environment variable beside "
    "call3/ring_default.json") for setting in ("NCCL_MAX_NCHANNELS=2", "NCCL_MAX_NCHANNELS=8", "NCCL_NCHANNELS_PER_PEER=1")})
# disagg_check_gpu.sh's profiled pass (profile_gpu.py, SEQPAR_FLASH_TUNE=0, --iters 1) on both GPU pairs of
# the fifth session: the same kind of diagnostic (no rebalancing on the 92k batch 1010 ms in both
# against 700 / 718 ms in the plain run of the same lane)
DIAGNOSTIC_FILES.update({f"2026-11-26-4xh100-5th/{lane}/disagg_profiled.json": (
    "the disagg bench under docs/benchmarks/profile_gpu.py with untuned kernels (SEQPAR_FLASH_TUNE=0), one timed "
    "iteration and each case profiled: not the benchmark's times (disagg_check_128k.json beside it is)")
    for lane in ("call2/gpu01_disagg_check_gpu", "call6/gpu23_disagg_check_gpu")})
# the twenty-first session: the benches under profile_gpu.py (every case profiled once; the LASP-2 run
# at --iters 5) and the split's short-document backward on FlashAttention-2 (SEQPAR_SPLIT_SHORT_BWD=flash,
# an option measured no faster and removed, 8596805), beside the default's runs as their A/B
DIAGNOSTIC_FILES.update({f"2026-11-28-gpu-21st/call1/{name}/bench.json": (
    "a bench under docs/benchmarks/profile_gpu.py (each timed case also profiled, --iters 5), run to see where "
    "the time goes: not the benchmark's times") for name in ("profile_lasp", "profile_ring_cudnn_keep")})
DIAGNOSTIC_FILES.update({f"2026-11-28-gpu-21st/call3/split_flash_r{r}.json": (
    "bench kernels with SEQPAR_SPLIT_SHORT_BWD=flash (the split's short documents' backward on FlashAttention-2, "
    "opt-in at f64a9a0, removed in 8596805), an A/B beside call3/split_triton_r*.json") for r in (1, 2)})

# A/B runs of code other than what stands, each beside the standing code's rows in the same call, and
# runs of reverted variants: (file, {r} for its rounds 1 and 2) -> why
_CALL6 = ("bench lasp of call 6's A/B of the process group's own all-gather method (aaa2001, reverted: ~10 us a "
          "post): the new side ran reverted code, the old side the code before it, in one call")
_AB_ROUNDS = {
    # the twenty-third session: lasp_host_ab_gpu.sh's runs of the code before 07a8811
    "2026-11-28-gpu-23rd/call8/lasp_old_r{r}.json": (
        "bench lasp at the code before 07a8811 (the state exchange folded by torch.einsum), run after that commit "
        "beside the new code's rows in the same call as their A/B: its time says the new code's era, its code the "
        "one before"),
    # the twenty-fourth session
    "2026-11-28-gpu-24th/call2/lasp_old_r{r}.json": (
        "bench lasp at 55f7469, before kernels/launch.py (every Triton launch through Triton's binder), run "
        "beside the new code's rows in the same call as their A/B"),
    "2026-11-28-gpu-24th/call3/lasp_copy_r{r}.json": (
        "bench lasp with SEQPAR_STATE_TRANSPORT=copy (the states' all-gather by the copy engines, a062348, "
        "reverted: slower)"),
    "2026-11-28-gpu-24th/call5/lasp_r{r}.json": (
        "bench lasp with each step's backward in the calling thread (9ff6146, reverted: no gain), a measurement "
        "method the other lasp runs do not share"),
    "2026-11-28-gpu-24th/call6/lasp_old_r{r}.json": _CALL6,
    "2026-11-28-gpu-24th/call6/lasp_new_r{r}.json": _CALL6,
    # the twenty-fifth session
    "2026-11-28-gpu-25th/call1/lightning_new_r{r}.json": (
        "bench kernels --only lightning at ed89414 (the state pass as one weighted sum over token blocks, reverted "
        "in f34a13f: no faster, the pass sits at the HBM roofline either way)"),
    # the twenty-sixth session: ring_send_ab_gpu.sh's runs of the code before 95a8d48 (call 4: round 3 below)
    **{f"2026-11-28-gpu-26th/call3/old_{case}_r{{r}}.json": (
        "bench ring at cbd013f, before 95a8d48 (a ring of 2 sent all its K/V rows), run beside the new code's rows "
        "in the same call as their A/B") for case in ("flash_keep1", "cudnn_keep1", "flash_keep0")},
}
DIAGNOSTIC_FILES.update({name.format(r=r): why for name, why in _AB_ROUNDS.items() for r in (1, 2)})
DIAGNOSTIC_FILES.update({f"2026-11-28-gpu-26th/call4/old_{case}_r3.json": _AB_ROUNDS[
    "2026-11-28-gpu-26th/call3/old_flash_keep1_r{r}.json"] for case in ("flash_keep1", "flash_keep0")})
# the twenty-seventh session: environment A/Bs of the disagg bench beside its plain runs (calls 1, 5)
DIAGNOSTIC_FILES.update({f"2026-11-28-gpu-27th/call2/disagg_2gpu_{n}_scratch8g.json": (
    "bench disagg with SEQPAR_CUDNN_SCRATCH_MB=8192 (documents up to 104k tokens on cuDNN, 26k by default), an A/B "
    "of an environment variable beside call1's runs: every method faster, disagg's ratio to the ideal worse")
    for n in ("64k", "128k")})
DIAGNOSTIC_FILES.update({f"2026-11-28-gpu-27th/call4/disagg_128k_hiprio{hp}_r{r}.json": (
    "bench disagg on three wlbllm 128k batches with TORCH_NCCL_HIGH_PRIORITY=0/1 alternating, the A/B that "
    "f0ec2cd followed: ping-pong's waits, not a full case") for hp in (0, 1) for r in (1, 2)})
DIAGNOSTIC_FILES["2026-11-28-gpu-26th/call1/light/lightning.json"] = (
    "bench kernels --only lightning on one GPU of two while the other ran flash_file_ab_gpu.py on the same host: "
    "one 64k row 3.89 ms fwd+bwd against 3.45-3.78 in call 6 and 3.67 in call 7 (alone, one H200)")

# Runs whose step times something outside the run slowed (memory peaks unaffected: each process's own
# allocator): (folder/file) -> why. Their times feed no constant (fit_e2e) and validate lists them
# under `excluded`, not as cases; their memory peaks stay memory twins.
CONTAMINATED_TIMES = {f"2026-11-26-4xh100-6th/call3/gpu23_disagg_dp_cp_gpu/{name}_metrics.jsonl": (
    "the sixth session's call 3 ran disagg_dp_cp_gpu.sh on GPUs 2-3 while GPU 0 ran memory_peak_gpu.sh (every "
    "allocation recorded with its stack trace) on the same host: both runs of that call were slower than the same "
    "script's in the fifth session (dp2 0.497 s per step against 0.367 / 0.379 s in its calls 2 / 8, +31-35%; "
    "dp2 + disagg dp_cp 0.415 s against 0.379 / 0.351 s, +9-18%), with no change of the code they ran that the "
    "simulator prices to explain it; to be measured again alone") for name in ("dp2", "dp2_disagg_dp_cp")}


def contaminated(path) -> str | None:
    """Why a run's step times are left out (`CONTAMINATED_TIMES`), or None."""
    return CONTAMINATED_TIMES.get(run_key(path))


def diagnostic(path) -> str | None:
    """Why a benchmark file's timings are left out (`DIAGNOSTIC_FILES`), or None."""
    return DIAGNOSTIC_FILES.get(run_key(path))


def diagnostic_exclusions(root=None) -> list[dict]:
    """The `DIAGNOSTIC_FILES` present under `root`, as validate's `excluded` entries."""
    root = Path(root or bench_dir())
    return [{"name": f"every case of {key}", "measured_s": None, "reason": why}
            for key, why in DIAGNOSTIC_FILES.items() if (root / key).is_file()]


def folder_health(path: str) -> str | None:
    """Why a folder's timings cannot be trusted (its same-call anchor far below ANCHORS.md), or None."""
    anchor = Path(path).parent / "anchors_e2e.json"
    if not anchor.is_file():
        return None
    try:
        rows = json.loads(anchor.read_text())
        eager = next(r for r in rows if r.get("mode") == "eager")
    except (json.JSONDecodeError, StopIteration, AttributeError):
        return None
    if eager["tokens_per_s"] < 0.8 * ANCHOR_E2E_EAGER_TOKENS_S:
        return (f"the anchor measured in the same call ran at {eager['tokens_per_s']} tokens/s, "
                f"{eager['tokens_per_s'] / ANCHOR_E2E_EAGER_TOKENS_S:.0%} of ANCHORS.md's {ANCHOR_E2E_EAGER_TOKENS_S}: "
                "a throttled or shared card")
    return None


# ---------------------------------------------------------------- samples (calls, measured seconds)

def ring_samples(found) -> list[dict]:
    """Attention samples of the ring bench: {group, family, kind, S, world, calls/steps, measured};
    kind single, ring, ring_compute, or allgather (`attention.allgather` beside the ring)."""
    from seqpar.bench.ring import lognormal_lengths

    out = []
    for path, data in found["ring"]:
        world, era = data.get("world", 2), era_of(path, data)
        for row in data.get("dense", []):
            if "error" in row:
                continue
            S, fam, H, D = row["S"], row["kernel"], row["H"], row["D"]
            if fam not in ("cudnn", "flash"):  # the Triton family: the simulator prices torch's kernels only
                continue
            base = dict(group=f"ring S={S}", family=fam, S=S, world=world, H=H, D=D, file=path,
                        bounds=(0, S), era=era)
            out.append(dict(base, kind="single", measured=row["single_ms"] / 1e3))
            out.append(dict(base, kind="ring_compute", measured=row["compute_only_ms"] / 1e3))
            out.append(dict(base, kind="ring", measured=row["ring_ms"] / 1e3))
            if "allgather_ms" in row:  # --methods allgather (zigzag), no fit uses it
                out.append(dict(base, kind="allgather", measured=row["allgather_ms"] / 1e3))
        for row in data.get("packed", []):
            S = row["S"]
            lens = lognormal_lengths(S)
            if len(lens) != row.get("n_docs", len(lens)) or max(lens) != row.get("max_doc", max(lens)):
                continue  # not the documents that were measured: cannot be modelled
            bounds = tuple(itertools.accumulate([0] + lens))
            for fam in ("cudnn", "flash"):
                r = row.get(fam)
                if not r or "error" in r:
                    continue
                base = dict(group=f"ring packed S={S}", family=fam, S=S, world=world, H=row["H"], D=row["D"],
                            file=path, bounds=bounds, era=era)
                if fam == "flash":  # the single-GPU row is varlen flash for every family
                    out.append(dict(base, kind="single", measured=r["single_ms"] / 1e3))
                out.append(dict(base, kind="ring", measured=r["ring_ms"] / 1e3))
                ag = row.get(f"{fam}_allgather")
                if ag and "error" not in ag:
                    out.append(dict(base, kind="allgather", measured=ag["allgather_ms"] / 1e3))
                for layout in ("doc_zigzag", "doc_balanced"):  # the same documents under a document layout
                    zz = row.get(f"{fam}_{layout}")
                    if zz and "error" not in zz:
                        out.append(dict(base, kind="ring", layout=layout, measured=zz["ring_ms"] / 1e3))
                        if "compute_only_ms" in zz:
                            out.append(dict(base, kind="ring_compute", layout=layout,
                                            measured=zz["compute_only_ms"] / 1e3))
    return out


# Rows measured again with the same code that disagree with their first measurement for a reason
# outside what the simulator models: (folder, method as lasp_samples names it, tokens) -> why. The
# row is listed under `excluded` and feeds no fit; the first measurement stays a case.
NOT_COMPARABLE = {
    ("2026-11-26-2xh100-profile", "lasp2", 65536): (
        "the same code and case as 2026-11-25-2xh100-linear's lasp2_serial row (lasp.py and the lightning "
        "kernel unchanged between 20:40 and 00:47 but for names and docstrings; lasp2_attention ran that serial "
        "schedule), measured at 5.44 ms there against 6.84 ms here. The GPU work agrees: the 1-GPU kernel rows "
        "(5.82 / 5.84 ms) and the 256k rows (16.03 / 15.92 ms) of both runs are within 0.7%. At 64k that era's "
        "code was host-bound (the profile shows the GPU idle on the geometry's host copies, ~2 of 5.4 ms), so "
        "the 1.4 ms between the two runs is the host's speed, which the simulator does not model, and no one "
        "prediction can be within 10% of both. The 2026-11-25 run is kept: its LASP-1 row (the same kernel "
        "path and host copies, held out of the LASP fit) measured 6.24 ms in the same call, within 10% of what "
        "the constants fitted with the 6.84 ms row give (+9.9%), not of what the 5.44 ms row would give (-13%)"),
}


# LASP rows that the host's speed decided (the simulator does not model host time): (folder/file as
# `run_key` names it, tokens or None for every row) -> why. Listed under `excluded`; no fit uses them.
_LASP_HOST = ("LASP-2 at 64k on 2 GPUs is host-bound: the seventh session's lasp_host.py (H100, call 3) timed "
              "2.89 ms per layer with the host enqueueing 2.29 ms of it, 2.69 ms for the kernel alone")
HOST_BOUND_LASP = {
    ("2026-11-26-4gpu-7th/call2/gpu01_profile_bench_gpu_lasp/lasp.json", None): (
        "profile_bench_gpu.sh lasp ran beside CPU-heavy compile jobs on the same host (call 2's other lanes): "
        "LASP-2 at 64k 3.59 ms against 2.5 ms for the kernel alone; " + _LASP_HOST),
    ("2026-11-26-4gpu-7th/call4/gpu23_lasp_host_gpu/lasp.json", 65536): (
        "call 4's 64k rows (H200) are slower than call 3's on H100 (LASP-2 3.66 against 2.90 ms) with the same "
        "code: its own lasp_host.py timed LASP-2 at 3.37 ms with the host enqueueing 3.36 ms of it (the kernel "
        "alone 2.48 ms); " + _LASP_HOST),
}


def not_comparable(path, method: str, tokens: int) -> str | None:
    """Why a measurement is left out (`NOT_COMPARABLE`, `HOST_BOUND_LASP`), or None."""
    key = run_key(path)
    return (NOT_COMPARABLE.get((run_folder(path).name, method, tokens)) or HOST_BOUND_LASP.get((key, tokens))
            or HOST_BOUND_LASP.get((key, None)))


def lasp_samples(found) -> list[dict]:
    """LASP rows as `lasp2` (what lasp2_attention runs), `lasp2_overlapped` (the schedule it is
    compared with) and `lasp1`. Files that have a `lasp2_serial` row are of the bench's first naming,
    where `lasp2` was the overlapped schedule and `lasp2_serial` what lasp2_attention ran. A row of
    `NOT_COMPARABLE` carries its reason under `not_comparable`."""
    out = []
    for path, data in found["lasp"]:
        world = data.get("world", 2)
        rows = data.get("rows", [])
        old_names = any(r.get("method") == "lasp2_serial" for r in rows)
        rename = {"lasp2": "lasp2_overlapped", "lasp2_serial": "lasp2"} if old_names else {}
        for row in rows:
            method = rename.get(row.get("method"), row.get("method"))
            if method in ("lasp2", "lasp1", "lasp2_overlapped"):
                out.append(dict(group=f"lasp T={row['tokens']}", method=method, tokens=row["tokens"],
                                world=world, H=data.get("heads", 32), D=data.get("dim", 128), file=path,
                                measured=row["ms"] / 1e3, single=(row.get("single_ms") or 0) / 1e3,
                                era=era_of(path, data), not_comparable=not_comparable(path, method, row["tokens"])))
    return out


# the kernels bench's packed flash rows the simulator prices: (bench kernel name) -> how
KERNEL_ROWS = {"torch_varlen_flash": "flash", "seqpar_triton": "triton", "seqpar_split": "split"}


def kernel_samples(found) -> list[dict]:
    """The kernels bench's packed rows of torch's varlen flash, seqpar's Triton kernel and the split
    (one GPU, fwd + bwd) on the anchor's lognormal documents (redrawn: rows whose document count or
    longest document differ are skipped). The split's long documents ran at their bucket lengths,
    but for the `split_exact*` files (exact lengths, before the buckets: `per_octave` 0)."""
    from seqpar.bench.ring import lognormal_lengths

    out = []
    for path, data in found["kernels"]:
        flash = data.get("flash") if isinstance(data.get("flash"), dict) else {}
        for row in flash.get("rows", []):
            how = KERNEL_ROWS.get(row.get("kernel"))
            if how is None or row.get("layout") != "packed" or not row.get("fwdbwd_ms"):
                continue
            lens = lognormal_lengths(row["S"])
            if len(lens) != row.get("n_docs") or max(lens) != row.get("max_doc"):
                continue
            out.append(dict(group=f"kernels packed S={row['S']}", kernel=how, S=row["S"], H=row["H"], D=row["D"],
                            docs=tuple(lens), measured=row["fwdbwd_ms"] / 1e3, file=path, era=era_of(path, data),
                            per_octave=0 if Path(path).name.startswith("split_exact") else None))
    return out


def disagg_samples(found, seed: int = 0) -> list[dict]:
    """The disagg bench's cases with each batch's document bounds redrawn as the bench drew them
    (its --seed, default 0, is not in the JSON: a batch whose document count or longest document
    differs is not the one measured and is skipped). GPU runs only. Each file's samples are drawn
    once per process (the same objects every call: callers read them, never change them)."""
    return [x for path, data in found["disagg"] for x in _file_disagg_samples(path, data, seed)]


_DISAGG_DRAWN: dict = {}


def _file_disagg_samples(path, data, seed) -> list[dict]:
    try:  # the file as it is on disk: a rewritten file is drawn again
        st = os.stat(path)
        key = (str(path), seed, st.st_mtime_ns, st.st_size)
    except OSError:
        return _draw_disagg_samples(path, data, seed)
    if key not in _DISAGG_DRAWN:
        _DISAGG_DRAWN[key] = _draw_disagg_samples(path, data, seed)
    return _DISAGG_DRAWN[key]


def _draw_disagg_samples(path, data, seed) -> list[dict]:
    import random

    from seqpar.bench.disagg import draw_bounds, load_mix

    if "NVIDIA" not in str(data.get("device", "")):
        return []
    out, world, mixes = [], data.get("world", 2), {}
    for case in data.get("cases", []):
        mix, tokens = case["mix"], case["tokens_per_rank"]
        try:
            if mix not in mixes:
                mixes[mix] = None if mix == "lognormal" else load_mix(mix)
        except (OSError, ValueError):
            continue
        rng = random.Random(seed * 1000003 + tokens)
        batches = []
        for b, row in enumerate(case.get("rows", [])):
            bounds = tuple(draw_bounds(mix, mixes[mix], tokens, world, rng, seed=seed * 1000 + b))
            docs = [y - x for x, y in zip(bounds, bounds[1:])]
            if len(docs) == row.get("n_docs") and max(docs) == row.get("max_doc"):
                batches.append((bounds, row))
        if batches:
            out.append(dict(group=f"disagg {mix} {tokens}", mix=mix, tokens=tokens, world=world, file=path,
                            eps=data.get("eps", 0.1), min_chunk=data.get("min_chunk", 128),
                            task_overhead=data.get("task_overhead_pairs"),
                            H=data.get("heads", 32), Hkv=data.get("kv_heads", 8), D=data.get("head_dim", 128),
                            packed_kernel=packed_kernel_of(data, path), era=era_of(path, data),
                            lse_split=lse_split_of(data), lse_prefix=(data.get("server_kernels") or {}).get(
                                "cudnn_prefix"), batches=batches,
                            skipped=len(case.get("rows", [])) - len(batches)))
    return out


def lse_split_of(data: dict) -> bool | None:
    """Whether a disagg bench run's servers ran their calls (bounds, lse) on the split's lse form, as
    its `server_kernels` records (a run with SEQPAR_ATTN_KERNEL=split did before cec5aa8 made it the
    default); None where the file does not say (its era decides: attention_cost.lse_split_applies)."""
    tasks = (data.get("server_kernels") or {}).get("tasks") or {}
    return tasks["forward"] == "split" if "forward" in tasks else None


# The end-to-end runs of docs/benchmarks: which job each metrics file is (the scripts' commands).
E2E_RUNS = {  # fit: the constant the run fits (calibrate.fit_e2e); None: held out of every fit
    "llama_1b_16k_metrics.jsonl": dict(
        world=1, script="docs/benchmarks/foundation_gpu.sh", fit="compute",
        overrides=["model=llama_1b", "parallel=none", "data=synthetic", "data.seq_len=16384", "data.distribution=fixed",
                   "data.mean_len=16384", "train=long", "launcher.nproc_per_node=1"]),
    "default_job_metrics.jsonl": dict(world=2, script="docs/benchmarks/two_gpu_linear.sh", fit="layer_overhead",
                                      overrides=["launcher.nproc_per_node=2"]),
}
# docs/benchmarks/fourd_gpu.sh: llama_1b and hybrid_1b at 32k on 2 GPUs, one layout per run (held out)
_FOURD = ["data=synthetic", "data.seq_len=32768", "data.distribution=fixed", "data.mean_len=32768", "train=long",
          "train.steps=6", "train.warmup_steps=1", "train.global_batch_size=2", "train.micro_batch_size=1",
          "launcher.nproc_per_node=2"]
_FOURD_LAYOUTS = {"cp2": ["parallel.cp=2", "parallel.dp=1"],
                  "tp2": ["parallel.cp=1", "parallel.tp=2", "parallel.dp=1", "train.mlp_chunk_tokens=0"],
                  "dp2_fsdp2": ["parallel=none"],
                  # first measured in the fourth session of 2026-11-26 (fourd_2gpu.json only)
                  "dp2_zero2": ["parallel=none", "parallel.dp_engine=deepspeed", "parallel.zero_stage=2"],
                  "pp2_v2": ["parallel.cp=1", "parallel.pp=2", "parallel.virtual_stages=2", "parallel.dp=1"]}
E2E_RUNS.update({f"{model}_{name}_metrics.jsonl": dict(world=2, script="docs/benchmarks/fourd_gpu.sh", fit=None,
                                                       overrides=[f"model={model}", *_FOURD, *layout])
                 for model in ("llama_1b", "hybrid_1b") for name, layout in _FOURD_LAYOUTS.items()})

# docs/benchmarks/ring_keep_e2e_gpu.sh: llama_1b cp=2 with the ring at 32k, one sequence per step (held
# out; its run with SEQPAR_RING_KEEP_KV=1 beside it is not read: the model prices the ring moving K/V again)
E2E_RUNS["llama_1b_cp2_ring_keep0_metrics.jsonl"] = dict(
    world=2, script="docs/benchmarks/ring_keep_e2e_gpu.sh", fit=None,
    overrides=["model=llama_1b", *[o for o in _FOURD if not o.startswith("train.global_batch_size")],
               "train.global_batch_size=1", "parallel.cp=2", "parallel.dp=1", "parallel.softmax_sp=ring"])

# docs/benchmarks/scale_gpu.sh e2e: llama_1b and hybrid_1b at 64k tokens per GPU on 4 GPUs (held out);
# hybrid_1b's TP pair ran with selective checkpointing from 7dbbc09 on (its 4xh200 run was refused)
_SCALE4 = ["data=synthetic", "data.seq_len=262144", "data.distribution=fixed", "data.mean_len=262144", "train=long",
           "train.steps=4", "train.warmup_steps=1", "launcher.nproc_per_node=4"]
_SCALE4_LAYOUTS = {"cp4": ["parallel.cp=4", "parallel.dp=1", "train.global_batch_size=1"],
                   "cp2_dp2": ["parallel.cp=2", "parallel.dp=2", "train.global_batch_size=2"],
                   "cp2_tp2_dp1": ["parallel.cp=2", "parallel.tp=2", "parallel.dp=1", "train.global_batch_size=1",
                                   "train.mlp_chunk_tokens=0"],
                   "cp2_pp2": ["parallel.cp=2", "parallel.pp=2", "parallel.dp=1", "train.global_batch_size=2"]}
E2E_RUNS.update({f"{model}_{name}_metrics.jsonl": dict(
    world=4, script="docs/benchmarks/scale_gpu.sh", fit=None,
    overrides=[f"model={model}", *_SCALE4, *layout,
               *(["train.activation_checkpointing=selective"] if model == "hybrid_1b" and "tp2" in name else [])])
    for model in ("llama_1b", "hybrid_1b") for name, layout in _SCALE4_LAYOUTS.items()})

# docs/benchmarks/profile_step_gpu.sh: fourd_gpu.sh's dp2 (FSDP2) runs again, step 5 under the
# profiler (logging.profile_step=5: that step's time is the profiler's, left out); held out
E2E_RUNS.update({f"{model}_dp2_metrics.jsonl": dict(
    world=2, script="docs/benchmarks/profile_step_gpu.sh", fit=None, profiled_step=5,
    overrides=[f"model={model}", *_FOURD, *_FOURD_LAYOUTS["dp2_fsdp2"]]) for model in ("llama_1b", "hybrid_1b")})
# docs/benchmarks/disagg_dp_cp_gpu.sh: llama_1b dp2 at 16k tokens per GPU of lognormal documents (mean
# 4k), plain data parallelism and disagg over dp_cp (held out; the model draws its own rows of the mix)
_DP_CP = ["model=llama_1b", "parallel=none", "data=synthetic", "data.seq_len=16384", "data.distribution=lognormal",
          "data.mean_len=4096", "data.sigma=1.0", "train=long", "train.steps=12", "train.warmup_steps=1",
          "train.global_batch_size=2", "train.micro_batch_size=1", "launcher.nproc_per_node=2"]
# From the seventh session of 2026-11-26 on the script has more lanes (ring CP, per-document CP, the
# one-GPU balanced ideal, disagg without the prefix pieces) and takes SEQ: a lane folder named
# `..._disagg_dp_cp_gpu_<SEQ>` ran SEQ tokens per GPU (mean SEQ / 4, selective checkpointing above 16k)
_DP_CP_LANES = {"dp2": ([], None), "dp2_disagg_dp_cp": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp"], None),
                # SEQPAR_CUDNN_PREFIX=0: the servers' causal pieces over a prefix stay in the Triton call
                "dp2_disagg_noprefix": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp"], False),
                "dp2_disagg_prefix": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp"], True),
                "dp2_disagg_prefix_eps02": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp",
                                             "parallel.disagg.eps=0.02"], True),
                "dp2_disagg_prefix_halves_eps02": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp",
                                                    "parallel.disagg.schedule=halves", "parallel.disagg.eps=0.02"],
                                                   True),
                **{f"dp2_disagg_eps{e[2:]}": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp",
                                               f"parallel.disagg.eps={e}"], None) for e in ("0.05", "0.02")},
                # a Triton pair weighed as 1.NN cuDNN pairs by the planner (1.05: twelfth session, worse;
                # 1.55: fifteenth, better than 1.7 and the default since; 1.18 and 1.30: twenty-eighth,
                # the cost table's fits, 1.30 the default since be4b206)
                **{f"dp2_disagg_tc{tc}{x}": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp",
                                              f"parallel.disagg.triton_cost=1.{tc[1:]}", *e], None)
                   for tc in ("105", "118", "130", "140", "155") for x, e in (("", []), ("_eps02", ["parallel.disagg.eps=0.02"]))},
                **{f"dp2_disagg_{s}{x}": (["parallel.softmax_sp=disagg", "parallel.disagg.group=dp_cp",
                                           f"parallel.disagg.schedule={s}", *e], None)
                   for s in ("halves", "ping_pong", "local_remote")
                   for x, e in (("", []), ("_eps02", ["parallel.disagg.eps=0.02"]))},
                "cp2_ring": (["parallel.cp=2", "parallel.softmax_sp=ring", "parallel.layout=zigzag"], None),
                "cp2_per_doc": (["parallel.cp=2", "parallel.softmax_sp=ring", "parallel.layout=doc_zigzag"], None),
                # one GPU running both rows (two micro-batches): half its step is the balanced ideal
                "ideal_1gpu": (["launcher.nproc_per_node=1"], None),
                # every document SEQ / 4 long (eighth session): equal work on both ranks, plain dp's own cost
                "dp2_fixed": (["data.distribution=fixed"], None),
                "ideal_1gpu_fixed": (["launcher.nproc_per_node=1", "data.distribution=fixed"], None)}


def dp_cp_run(lane: str, seq: int = 16384, mix: str | None = None) -> dict | None:
    """The E2E_RUNS entry of disagg_dp_cp_gpu.sh's lane `lane` at SEQ tokens per GPU (held out),
    of lognormal documents or of DistCA's length mix `mix` (MIX=wlbllm|prolong, docs/benchmarks/data);
    a lane named `<lane>_profiled<N>` had step N profiled (logging.profile_step=N), which is left out."""
    profiled = re.fullmatch(r"(.+)_profiled(\d+)", lane)
    if profiled:
        run = dp_cp_run(profiled.group(1), seq, mix)
        return run and {**run, "profiled_step": int(profiled.group(2))}
    if lane not in _DP_CP_LANES:
        return None
    extra, prefix = _DP_CP_LANES[lane]
    base = [o for o in _DP_CP if not o.startswith(("data.seq_len=", "data.mean_len=", "train.steps=",
                                                   "data.distribution=", "data.sigma="))]
    docs = (["data.distribution=file", f"data.lengths_file={bench_dir() / 'data' / f'{mix}.json.gz'}"] if mix
            else ["data.distribution=lognormal", f"data.mean_len={seq // 4}", "data.sigma=1.0"])
    overrides = [*base, f"data.seq_len={seq}", *docs, f"train.steps={12 if seq <= 16384 else 8}",
                 f"train.activation_checkpointing={'selective' if seq > 16384 else 'none'}", *extra]
    world = 1 if "launcher.nproc_per_node=1" in extra else 2
    return dict(world=world, script="docs/benchmarks/disagg_dp_cp_gpu.sh", fit=None, overrides=overrides,
                **({"lse_prefix": prefix} if prefix is not None else {}), **({"mix": mix} if mix else {}))


# the lanes before the seventh session, at 16k (their files lie in lanes without the SEQ suffix)
E2E_RUNS.update({f"{lane}_metrics.jsonl": dp_cp_run(lane) for lane in ("dp2", "dp2_disagg_dp_cp")})

# Runs made before seqpar's Triton RMSNorm/RoPE/fused CE and its bf16 residual stream (commit
# 14f0567's notes, docs/benchmarks/README.md): torch's element-wise ops and an fp32 residual.
TORCH_ELEMENTWISE_RUNS = {"2026-11-25-h100-foundation", "2026-11-25-h100-llama1b", "2026-11-25-h100-llama1b-sdpa",
                          "2026-11-25-2xh100-linear"}


# maxlen runs whose memory peaks say nothing about today's code, and why
MAXLEN_LAZY_STATES = {"2026-11-25-h100-maxlen"}  # before the engine created AdamW's states up front
MAXLEN_NOT_COMPARABLE = {
    "2026-11-26-2xh200-pm/maxlen_8b_cp2.json":
        "its AdamW moments were on the GPU, not in host memory as train.offload_optimizer means "
        "(DTensor.from_local moved them to the mesh's device; fixed in d7e0cd4): 30 GiB per GPU the estimate "
        "rightly leaves out",
}


def maxlen_exclusions(found) -> list[dict]:
    """The maxlen benchmark's one-step trials: their times (the first step's warm-up included)
    validate nothing, and neither do the memory peaks of the runs named above."""
    out = []
    for path, data in found["maxlen"]:
        folder = run_folder(path).name
        odd = MAXLEN_NOT_COMPARABLE.get(run_key(path))
        if data.get("steps_per_trial", 1) >= 2 and folder not in MAXLEN_LAZY_STATES:
            continue  # its last step is a case (maxlen_step_samples)
        for res in data.get("results", []):
            reason = "one step per trial (its time includes the first step's warm-up)"
            if folder in MAXLEN_LAZY_STATES:
                reason += ("; its memory peak lacks the optimizer states, which were created lazily after the "
                           "first step then")
                if "offload" in res.get("mode", ""):
                    reason += "; the offload mode also had a leak fixed since"
            elif odd:
                reason += f"; its memory peak: {odd}"
            out.append({"name": f"maxlen {data.get('model')} {res.get('mode')} {res.get('max_seq_len', 0) // 1024}k",
                        "measured_s": None, "reason": reason, "file": os.path.relpath(path)})
    return out


def maxlen_memory_samples(found) -> list[dict]:
    """Peaks of the maxlen trials that fit, with the overrides the benchmark ran them with."""
    from seqpar.bench.maxlen import base_overrides, trial_overrides

    out = []
    for path, data in found["maxlen"]:
        folder = run_folder(path).name
        if folder in MAXLEN_LAZY_STATES or run_key(path) in MAXLEN_NOT_COMPARABLE:
            continue
        gpus = data.get("gpus", 1)
        for res in data.get("results", []):
            for t in res.get("trials", []):
                if t.get("fits") and t.get("max_mem_gb"):
                    # named by the lane too: a session's calls may repeat a trial (the sixth's 128k)
                    out.append({"name": f"maxlen {Path(run_key(path)).parent}/{data['model']} {res['mode']} "
                                        f"{t['seq_len'] // 1024}k "
                                        f"on {gpus} GPU{'s' if gpus > 1 else ''}",
                                "world": gpus, "measured_mem_gib": t["max_mem_gb"], "era": era_of(path, data),
                                "overrides": trial_overrides(base_overrides(data["model"], gpus), res["overrides"],
                                                             t["seq_len"], data.get("steps_per_trial", 1))})
    return out


# docs/benchmarks/memory_peak_gpu.sh: one llama_1b step on one GPU under logging.memory_snapshot, its
# peak in `<mode>_<seq>_peak.txt` (the first line: "peak allocated X GiB"); the script's modes
_MEMORY_PEAK_MODES = {
    "full": ["train.activation_checkpointing=full"],
    "full_offload": ["train.activation_checkpointing=full", "train.offload_activations=true",
                     "train.mlp_chunk_tokens=8192"],
    "selective_chunked": ["train.activation_checkpointing=selective", "train.mlp_chunk_tokens=8192"],
}


def memory_peak_samples(root=None) -> tuple[list[dict], list[dict]]:
    """(memory twins, superseded) of memory_peak_gpu.sh's peaks: of one (mode, length) the latest
    run's peak (the estimate describes today's code); the earlier ones as validate's `excluded`."""
    root = Path(root or bench_dir())
    latest = {}
    for path in sorted(glob.glob(str(root / "*" / "**" / "*_peak.txt"), recursive=True)):
        m = re.fullmatch(r"(\w+?)_(\d+)_peak\.txt", Path(path).name)
        line = Path(path).read_text().split("\n", 1)[0]
        peak = re.match(r"peak allocated ([0-9.]+) GiB", line)
        if not (m and peak and m.group(1) in _MEMORY_PEAK_MODES):
            continue
        mode, seq = m.group(1), int(m.group(2))
        sample = {"name": f"memory_peak {run_key(path).rsplit('/', 1)[0]} llama_1b {mode} {seq // 1024}k on 1 GPU",
                  "world": 1, "measured_mem_gib": float(peak.group(1)), "era": era_of(path), "file": path,
                  "overrides": ["model=llama_1b", "train=long", "data=synthetic", "data.distribution=fixed",
                                f"data.seq_len={seq}", f"data.mean_len={seq}", "parallel.cp=1", "train.steps=1",
                                "train.warmup_steps=1", "launcher.nproc_per_node=1", *_MEMORY_PEAK_MODES[mode]]}
        latest.setdefault((mode, seq), []).append(sample)
    twins, superseded = [], []
    for runs in latest.values():
        runs.sort(key=lambda s: (era_of(s["file"]), str(run_date(s["file"])), s["file"]))
        twins.append(runs[-1])
        superseded += [{"name": f"memory of {s['name']}", "measured_s": None,
                        "reason": f"the same configuration measured again later ({runs[-1]['name']}, "
                                  f"{runs[-1]['measured_mem_gib']:.2f} GiB against {s['measured_mem_gib']:.2f} here)"}
                       for s in runs[:-1]]
    return twins, superseded


def e2e_run_of(path) -> dict | None:
    """The E2E_RUNS entry of a metrics file; the fourth session of 2026-11-26 named its copies
    `e2e_<model>_<layout>_metrics.jsonl`; a disagg_dp_cp_gpu.sh lane folder says its SEQ (`dp_cp_run`),
    disagg_waits_gpu.sh's `schedules` folder holds its lanes at 64k."""
    name = Path(path).name
    folder = Path(path).parent.name
    lane = re.fullmatch(r".*disagg_dp_cp_gpu(?:_(wlbllm|prolong))?(?:_(\d+))?", folder)
    if (lane or folder == "schedules") and name.endswith("_metrics.jsonl"):  # disagg_waits_gpu.sh's mode: 64k
        seq, mix = (int(lane.group(2) or 16384), lane.group(1)) if lane else (65536, None)
        run = dp_cp_run(name[:-len("_metrics.jsonl")], seq, mix)
        if run:
            return run
    return E2E_RUNS.get(name) or (E2E_RUNS.get(name[len("e2e_"):]) if name.startswith("e2e_") else None)


def e2e_samples(found) -> list[dict]:
    """Whole training steps: the metrics files E2E_RUNS names (median of steps 3 on; the mean for a
    run of DistCA's length mixes, whose step is the mean over drawn rows in the model too: a few
    steps holding a long document run 1.5-2.6 s against a median of ~1.44 s, 2026-11-28-gpu-30th),
    then the fourd_2gpu.json summaries of runs whose metrics file did not come back (`fourd_samples`)."""
    out = []
    for path, rows in found["e2e"]:
        run = e2e_run_of(path)
        if run is None:
            continue
        timed = [r for r in rows if "step_time_s" in r and r.get("step") != run.get("profiled_step")]
        steady = [r for r in timed if r.get("step", 0) >= 3]  # steps 1-2: warm-up, compile
        note = f"step {run['profiled_step']} (profiled) left out" if run.get("profiled_step") else ""
        if not steady and len(timed) >= 2:
            # a run cut by its time limit before step 3: the last step past the first (step 1 compiles
            # and tunes) stands for it, and the case says so. Less sure than steps 3 on: over the
            # committed runs step 2 took 0.99-1.06x step 3's time in most, up to 1.12x in two
            steady = [timed[-1]]
            note = f"step {steady[0].get('step')} only (the run was cut before step 3)"
        if not steady:
            continue
        mem = max((r.get("max_mem_gb") or 0) for r in rows) or None
        # named by the lane where the file lies below its run folder (a session's calls repeat a lane)
        name = f"e2e {Path(run_key(path)).parent}/{Path(path).stem}"
        old_code = run_folder(path).name in TORCH_ELEMENTWISE_RUNS
        overrides = run["overrides"] + (["model.fp32_residual=true"] if old_code else [])
        out.append(dict(group=name, name=name, file=path, world=run["world"], overrides=overrides, era=era_of(path),
                        fit=run.get("fit"), packed_kernel=packed_kernel_of({}, path), lse_prefix=run.get("lse_prefix"),
                        torch_elementwise=old_code,
                        measured=(statistics.mean if run.get("mix") else statistics.median)(
                            r["step_time_s"] for r in steady), measured_mem_gib=mem,
                        unhealthy=folder_health(path), contaminated=contaminated(path), note=note))
    return out + fourd_samples(found) + maxlen_step_samples(found)


def maxlen_step_samples(found) -> list[dict]:
    """The maxlen trials of more than one step that fit (`--steps 2`): their last step as a whole-step
    sample (held out; its memory peak is a maxlen memory twin already)."""
    from seqpar.bench.maxlen import base_overrides, trial_overrides

    out = []
    for path, data in found["maxlen"]:
        steps = data.get("steps_per_trial", 1)
        if steps < 2 or run_folder(path).name in MAXLEN_LAZY_STATES:
            continue
        gpus = data.get("gpus", 1)
        for res in data.get("results", []):
            for t in res.get("trials", []):
                if not (t.get("fits") and t.get("step_time_s")):
                    continue
                name = (f"maxlen {Path(run_key(path)).parent}/{data['model']} {res['mode']} {t['seq_len'] // 1024}k "
                        f"step {steps}")
                out.append(dict(group=name, name=name, file=path, world=gpus, era=era_of(path, data), fit=None,
                                overrides=trial_overrides(base_overrides(data["model"], gpus), res["overrides"],
                                                          t["seq_len"], steps),
                                packed_kernel=packed_kernel_of(data, path), torch_elementwise=False,
                                measured=float(t["step_time_s"]), measured_mem_gib=None,
                                unhealthy=folder_health(path), note=f"step {steps} of the trial (its last)"))
    return out


def fourd_samples(found) -> list[dict]:
    """fourd_gpu.sh's summary (`fourd_2gpu.json`: the mean step time of steps 3-6 and the peak of
    each run) as whole-step samples, for the runs whose metrics file is not beside it (a folder
    with both, 2026-11-26-2xh200-fourd, is read from its metrics files: one sample per run).
    Failed runs and layouts outside E2E_RUNS are skipped."""
    out = []
    for path, data in found["fourd_2gpu"]:
        folder = Path(path).parent
        for row in data.get("runs", []):
            key = f"{row.get('run')}_metrics.jsonl"
            run = E2E_RUNS.get(key)
            if run is None or row.get("failed") or not row.get("step_time_s") or (folder / key).is_file():
                continue
            if data.get("seq_len", 32768) != 32768:
                continue  # E2E_RUNS' fourd overrides are the script's default length
            name = f"e2e {folder.name}/{row['run']}"
            out.append(dict(group=name, name=name, file=path, world=run["world"], overrides=list(run["overrides"]),
                            era=era_of(path, data), fit=run.get("fit"), torch_elementwise=False,
                            packed_kernel=packed_kernel_of(data, path),
                            measured=float(row["step_time_s"]), measured_mem_gib=row.get("max_mem_gb") or None,
                            unhealthy=folder_health(path),
                            note=f"mean of steps {row.get('steps_timed')} (fourd_2gpu.json)"))
    return out
