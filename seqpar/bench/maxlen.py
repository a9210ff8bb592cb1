"""`python -m seqpar.bench maxlen --model llama_1b --out FILE.json`: the longest sequence (a multiple
of 8k) that one GPU trains, per memory mode, with tokens/s and MFU at that length.

Each trial is a real `python -m seqpar.train` run in its own process (one sequence per step, one
document per sequence), so an out-of-memory failure leaves nothing behind for
the next trial; it fits when the run exits cleanly. The memory estimate's check is off in trials
(`SEQPAR_MEMORY_CHECK=0`): the point is to measure the limit, and each trial records the
estimate beside `max_mem_gb`, which is how the estimate is validated. The search starts at the
longest length the estimate says fits (a trial at 512k takes minutes of attention alone), gallops
up or down from there by doubling steps, then bisects to the granularity. Every trial runs
`--steps` steps (default 1): the FSDP2 engine creates the optimizer's states before the first step
(`allocate_adam_states`), so one step already has every step's peak; the last step's tokens/s and
MFU are the answer's (the first step includes compiles and autotuning: negligible at 384k, not at
16k, where `--steps 2` is the honest speed).

`--cp 2` runs the same search on two GPUs with the sequence split over them (parallel.cp=2).
`--anchor PATH` also runs the plain PyTorch anchor (`anchors_e2e.py --maxlen`) and records its
answer in the same JSON. `--smoke` runs a tiny model on the CPU with small lengths: it exercises
the search and the trial runner, not memory (a CPU run does not run out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {  # name: overrides
    "none": ["train.activation_checkpointing=none"],
    "full": ["train.activation_checkpointing=full"],
    "selective": ["train.activation_checkpointing=selective"],
    "selective_chunked": ["train.activation_checkpointing=selective", "train.mlp_chunk_tokens=8192"],
    "full_offload": ["train.activation_checkpointing=full", "train.offload_activations=true",
                     "train.mlp_chunk_tokens=8192"],
    # also AdamW's moments in host memory (llama_8b on one GPU: 60 GiB of them)
    "full_offload_optimizer": ["train.activation_checkpointing=full", "train.offload_activations=true",
                               "train.mlp_chunk_tokens=8192", "train.offload_optimizer=true"],
}


def search(fits, start: int, step: int, max_len: int) -> int:
    """The largest multiple of `step` in [step, max_len] for which `fits(length)` holds (0 if
    none), assuming it holds below some limit and fails above it; starts at `start`."""
    start = min(max(step, start // step * step), max_len)
    if fits(start):
        lo, hi, jump = start, None, step
        while hi is None:  # gallop up: start + step, + 2 steps, + 4 steps, ...
            nxt = min(lo + jump, max_len)
            if nxt == lo:
                return lo
            if fits(nxt):
                lo, jump = nxt, jump * 2
            else:
                hi = nxt
    else:
        hi, lo, jump = start, None, step
        while lo is None:  # gallop down
            nxt = max(hi - jump, 0)
            if nxt == 0:
                return 0
            if fits(nxt):
                lo = nxt
            else:
                hi, jump = nxt, jump * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module
    from seqpar.config import register_configs

    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        return hydra_compose(config_name="train", overrides=[*overrides, "run_dir=unused"])


def base_overrides(model: str, cp: int) -> list[str]:
    """What every trial of `model` on `cp` GPUs runs with (one sequence of one document per step)."""
    return [f"model={model}", "train=long", "data=synthetic", "data.distribution=fixed",
            f"launcher.nproc_per_node={cp}", f"parallel.cp={cp}", "logging.console=false", "train.warmup_steps=1"]


def trial_overrides(base: list[str], mode: list[str], length: int, steps: int = 1) -> list[str]:
    return [*base, *mode, f"data.seq_len={length}", f"data.mean_len={length}", f"train.steps={steps}"]


def predicted_start(base: list[str], mode: list[str], step: int, max_len: int, capacity: int, world: int) -> int:
    """The longest length (a multiple of `step`, at least one step) whose estimate is within
    `capacity` bytes; bisected, as the estimate grows with the length."""
    from seqpar.memory import estimate

    fits = lambda n: estimate(compose(trial_overrides(base, mode, n)), world).total <= capacity
    lo, hi = 0, max_len // step + 1  # in steps: lo fits (or is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return max(lo, 1) * step


def _text(out) -> str:
    # TimeoutExpired keeps what was read before the kill, as bytes even under text=True
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def trial(base: list[str], mode: list[str], length: int, steps: int, timeout: float, log: list,
          world: int) -> dict | None:
    """Train `steps` steps at `length`; the last step's metrics if it fit, else None."""
    from seqpar.memory import estimate

    overrides = trial_overrides(base, mode, length, steps)
    predicted = estimate(compose(overrides), world).total_gb
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "seqpar.train", *overrides, f"run_dir={run_dir}"]
        env = {**os.environ, "SEQPAR_MEMORY_CHECK": "0"}
        started = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            ok, why = r.returncode == 0, (r.stderr or r.stdout)[-400:]
        except subprocess.TimeoutExpired as e:  # where it was, for the next, longer trial's budget
            ok, why = False, f"timeout after {timeout:.0f} s; last output: {_text(e.stderr or e.stdout)[-300:]!r}"
        metrics = Path(run_dir) / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if ok and metrics.exists() else []
        last = json.loads(lines[-1]) if lines else None
        startup = json.loads(lines[0]).get("startup_s") if lines else None
    if "invalid configuration" in why:  # the benchmark's own mistake, not a length that does not fit
        raise SystemExit(f"maxlen: {' '.join(overrides)}: {why}")
    oom = "out of memory" in why.lower() or "outofmemory" in why.lower()
    if oom:  # the sentence that says how much was asked for and what was held
        text = r.stderr or r.stdout
        why = next((line.strip()[-400:] for line in text.splitlines() if "Tried to allocate" in line), why)
    # the whole trial's wall time (process launch, imports, start-up, every step)
    entry = {"seq_len": length, "fits": last is not None, "predicted_gb": round(predicted, 2),
             "wall_s": round(time.perf_counter() - started, 1)}
    if last is None:
        entry["error"] = f"out of memory: {why}" if oom else why
    else:
        entry.update({k: last.get(k) for k in ("tokens_per_s", "mfu", "max_mem_gb", "step_time_s")})
        entry["startup_s"] = startup  # inside train(): model, optimizer states (the rest of wall_s: launch, steps)
    log.append(entry)
    print(json.dumps(entry), flush=True)
    return last


def run_anchor(path: str, timeout: float) -> list | dict:
    with tempfile.TemporaryDirectory() as out:
        r = subprocess.run([sys.executable, path, "--maxlen"], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "OUT": out})
        result = Path(out) / "anchors_maxlen.json"
        return json.loads(result.read_text()) if result.exists() else {"error": (r.stderr or r.stdout)[-1000:]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seqpar.bench maxlen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama_1b")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {list(MODES)}")
    ap.add_argument("--cp", type=int, default=1, help="GPUs, one sequence split over them (parallel.cp)")
    ap.add_argument("--step", type=int, default=8192, help="granularity of the answer (tokens)")
    ap.add_argument("--max-len", type=int, default=1 << 20)
    ap.add_argument("--steps", type=int, default=1,
                    help="steps of every trial; tokens/s and MFU from the last (2: past the first step's compiles)")
    ap.add_argument("--start", type=int, default=0, help="first length tried (default: the memory estimate's answer)")
    ap.add_argument("--trial-timeout", type=float, default=1800.0)
    ap.add_argument("--anchor", default=None, help="path of anchors_e2e.py to run its --maxlen beside")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests the search, not memory)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    model = "tiny_hybrid" if args.smoke else args.model
    base = base_overrides(model, args.cp)
    if args.smoke:
        base += ["train.device=cpu", "data.num_tokens=65536"]
        capacity = 28 << 20  # a pretend device, so that the estimate picks a start inside max_len
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            print("maxlen: no CUDA device (use --smoke for the CPU form)", file=sys.stderr)
            return 2
        if torch.cuda.device_count() < args.cp:
            print(f"maxlen: --cp {args.cp} needs {args.cp} GPUs, {torch.cuda.device_count()} here", file=sys.stderr)
            return 2
        capacity = torch.cuda.get_device_properties(0).total_memory
        device = torch.cuda.get_device_name(0)
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"maxlen: unknown modes {unknown}; choose from {list(MODES)}", file=sys.stderr)
        return 2

    out = {"benchmark": "maxlen", "model": model, "device": device, "gpus": args.cp, "parallel.cp": args.cp,
           "device_memory_gb": round(capacity / 2**30, 1), "step": args.step, "max_len": args.max_len,
           "steps_per_trial": args.steps, "date": datetime.date.today().isoformat(),
           "versions": {"torch": torch.__version__, "python": platform.python_version(),
                        "cuda": torch.version.cuda},
           "results": []}
    results = out["results"]

    def save(partial=None):  # after every trial: a run killed from outside keeps what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**out, "results": results + ([partial] if partial else [])}, indent=1) + "\n")

    for name in modes:
        mode = MODES[name]
        if args.smoke:  # chunks that the smoke form's short sequences actually split
            mode = [o.replace("mlp_chunk_tokens=8192", "mlp_chunk_tokens=64") for o in mode]
        start = predicted_start(base, mode, args.step, args.max_len, capacity, args.cp)
        trials, best_metrics = [], {}

        def fits(length):
            last = trial(base, mode, length, args.steps, args.trial_timeout, trials, args.cp)
            if last is not None:
                best_metrics[length] = last
            save({"mode": name, "overrides": mode, "unfinished": True, "trials": trials})
            return last is not None

        best = search(fits, args.start or start, args.step, args.max_len)
        at = best_metrics.get(best, {})
        results.append({"mode": name, "overrides": mode, "max_seq_len": best, "predicted_start": start,
                        "tokens_per_s": at.get("tokens_per_s"), "mfu": at.get("mfu"), "max_mem_gb": at.get("max_mem_gb"),
                        "trials": trials})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "trials"}), flush=True)

    if args.anchor:
        out["anchor"] = run_anchor(args.anchor, args.trial_timeout * 4)
    save()
    return 0
