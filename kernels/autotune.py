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

from seqpar.kernels import jit_stats
from seqpar.kernels.launch import Launch

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
    tune = triton.autotune(configs=configs, key=key, **kwargs)
    return lambda fn: Tuned(tune(fn))


class Tuned:
    """A tuned kernel whose launches skip `Autotuner.run`'s bookkeeping once their key is tuned.

    To find its tuning key Triton's autotuner builds dicts of all the kernel's arguments at every
    launch (and filters them by membership in a list of the argument names): tens of microseconds
    of host time per launch for kernels of ~40 arguments. The lightning kernel's fwd+bwd makes 8
    launches, and LASP-2 at 32k tokens per GPU was bound by the host on an H200 machine (2026-11-26,
    seventh session, docs/benchmarks). The first launch of each key goes through the autotuner
    (tuning, or its disk cache); later ones take the pick from a dict under the autotuner's own key
    (the key arguments' values, then every tensor argument's dtype) and launch the kernel with it,
    as the autotuner does for a key it knows; `launch.Launch` then remembers the compiled kernel,
    so a launch seen before skips Triton's binder too. Everything else is the autotuner's (`cache`,
    `configs`, ...); setting `configs` forgets the picks.
    """

    def __init__(self, tuner):
        object.__setattr__(self, "tuner", tuner)
        object.__setattr__(self, "_picks", {})
        object.__setattr__(self, "_key_at", {k: tuner.arg_names.index(k) for k in tuner.keys})
        object.__setattr__(self, "_names", frozenset(tuner.arg_names))
        object.__setattr__(self, "_launch", Launch(tuner.fn, exact=tuner.keys))

    def __getattr__(self, name):
        return getattr(self.tuner, name)

    def __setattr__(self, name, value):
        setattr(self.tuner, name, value)
        self._picks.clear()
        self._launch.forget()

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch.run(grid, args, kwargs, self._first)

    def _first(self, grid, args, kwargs):
        """A launch `Launch` has not seen: (its kernel, the config's launch options; None when a
        config pre-hook must run at every launch)."""
        key = self._key(args, kwargs)
        picked = self._picks.get(key)
        if picked is None:
            with jit_stats.tuning(self.tuner.fn.__name__, key):
                kernel = self.tuner.run(*args, grid=grid, warmup=False, **kwargs)
            if self.tuner.best_config.pre_hook is not None:
                return kernel, None
            picked = self._picks[key] = self.tuner.best_config.all_kwargs()
            return kernel, picked
        return self.tuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **picked), picked

    def _key(self, args, kwargs) -> tuple:
        n = len(args)
        values = tuple(args[i] if i < n else kwargs.get(name) for name, i in self._key_at.items())
        dtypes = tuple(str(a.dtype) for a in args if hasattr(a, "dtype"))
        dtypes += tuple(str(v.dtype) for k, v in kwargs.items() if k in self._names and hasattr(v, "dtype"))
        return values + dtypes
