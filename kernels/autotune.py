"""`autotune`: `triton.autotune` with its picks kept on disk, in Triton's cache directory, and
long kernels timed once per config.

Triton times every config of a kernel the first time a process meets a tuning key, and forgets
the picks when the process ends. On 4 H200 (2026-11-26) the first training step of each run took
42-64 s against 5-15 s for the next ones, in runs that followed each other on one machine with
every kernel already compiled. With `cache_results` a later process (the next run, a restart after
a failure) reads the picks instead: Triton keys them by the kernel's source, the target, the
configs and the tuning key, so a changed kernel or config list is timed again. Triton skips the
disk for configs with pre-hooks and in the interpreter. `SEQPAR_TUNE_CACHE=0` times afresh.

Triton's `do_bench` runs every config at least 8 times (one run, 5 to estimate, a warm-up and a
timed run): at 384k tokens an attention backward config takes seconds per run, so tuning one
layer's kernels took minutes and a one-GPU llama_1b trial at 384k ran past its 280 s (H100,
2026-11-26). `bench` times a config whose second run (the first compiles) takes at least
`LONG_MS` by that run alone (launch and timer jitter are microseconds, 0.1% of such a run);
shorter kernels keep Triton's full measurement.
"""
from __future__ import annotations

import inspect
import os

import triton

_PARAMS = inspect.signature(triton.autotune).parameters
_PERSISTS = "cache_results" in _PARAMS  # triton >= 3.2
LONG_MS = 20.0


def _time_once(fn) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench(fn, quantiles=None, *, time_once=_time_once, full=None, **kwargs):
    """The autotuner's benchmark: `fn`'s time in ms (a list, one per quantile, when asked for)."""
    fn()  # compiles on first use: not timed
    ms = time_once(fn)
    if ms < LONG_MS:
        return (full or triton.testing.do_bench)(fn, quantiles=quantiles, **kwargs)
    return [ms] * len(quantiles) if quantiles else ms


def autotune(configs, key, **kwargs):
    if _PERSISTS and os.environ.get("SEQPAR_TUNE_CACHE", "1") != "0":
        kwargs.setdefault("cache_results", True)
    if "do_bench" in _PARAMS:
        kwargs.setdefault("do_bench", bench)
    return triton.autotune(configs=configs, key=key, **kwargs)
