"""`autotune`: `triton.autotune` with its picks kept on disk, in Triton's cache directory.

Triton times every config of a kernel the first time a process meets a tuning key, and forgets
the picks when the process ends. On 4 H200 (2026-11-26) the first training step of each run took
42-64 s against 5-15 s for the next ones, in runs that followed each other on one machine with
every kernel already compiled. With `cache_results` a later process (the next run, a restart after
a failure) reads the picks instead: Triton keys them by the kernel's source, the target, the
configs and the tuning key, so a changed kernel or config list is timed again. Triton skips the
disk for configs with pre-hooks and in the interpreter. `SEQPAR_TUNE_CACHE=0` times afresh.
"""
from __future__ import annotations

import inspect
import os

import triton

_PERSISTS = "cache_results" in inspect.signature(triton.autotune).parameters  # triton >= 3.2


def autotune(configs, key, **kwargs):
    if _PERSISTS and os.environ.get("SEQPAR_TUNE_CACHE", "1") != "0":
        kwargs.setdefault("cache_results", True)
    return triton.autotune(configs=configs, key=key, **kwargs)
