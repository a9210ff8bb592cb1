"""Host time a training step spends compiling Triton kernels and timing their configs.

Both happen at the first launch of a new specialisation or tuning key, on the rank that meets it,
and under disaggregated attention the other ranks wait for that rank at the layer's next
all-to-all. On 2 H200 (llama_1b dp=2, 64k tokens per GPU of DistCA's wlbllm / prolong mixes,
2026-11-28) one rank waited 0.28-0.78 s at once for the other's results in steps 2-14 of 18,
each time at a step where the other rank first served something new (rows past the largest
tuned length bucket, a piece over a prefix). The training loop reports each step's totals (the
largest over the ranks) and prints, from step 2 on, every compile or tuning run that took longer
than `SLOW_S`, with its kernel and specialisation, so such a stall is named, not guessed.

`install()` chains Triton's JIT hooks (any hooks set before keep running); `autotune.Tuned`
reports its tuning runs through `tuning`. Compiles inside a tuning run count as the tuning's.
"""
from __future__ import annotations

import contextlib
import threading
import time

SLOW_S = 0.05


class _Stats:
    def __init__(self):
        self.compiles = self.tunes = 0
        self.compile_s = self.tune_s = 0.0
        self.slow: list[tuple[str, str, float]] = []  # (what, detail, seconds)


_stats = _Stats()
_open = threading.local()  # .started: (detail, start) of the thread's compile under way (one at a time)
_tuning_depth = [0]
_installed = [False]


def install() -> bool:
    """Times every Triton compile from now on; False where Triton has no JIT hooks (older than 3.4)."""
    if _installed[0]:
        return True
    try:
        from triton import knobs
    except ImportError:
        return False
    runtime = knobs.runtime
    if not (hasattr(runtime, "jit_cache_hook") and hasattr(runtime, "jit_post_compile_hook")):
        return False
    before_prev, after_prev = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def before(**kw):
        _open.started = (kw.get("repr") or str(kw.get("fn")), time.perf_counter())
        return before_prev(**kw) if before_prev else None  # True would skip the compile

    def after(**kw):
        started, _open.started = getattr(_open, "started", None), None
        if started:
            compiled(started[0], time.perf_counter() - started[1])
        return after_prev(**kw) if after_prev else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = before, after
    _installed[0] = True
    return True


def compiled(detail: str, seconds: float) -> None:
    """One compile (or a load of one from Triton's disk cache) of `detail` took `seconds`."""
    if _tuning_depth[0]:
        return
    _stats.compiles += 1
    _stats.compile_s += seconds
    if seconds > SLOW_S:
        _stats.slow.append(("compile", detail, seconds))


@contextlib.contextmanager
def tuning(name: str, key):
    """Around a tuning run of kernel `name` for `key` (its compiles count as the run's)."""
    _tuning_depth[0] += 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _tuning_depth[0] -= 1
        seconds = time.perf_counter() - start
        _stats.tunes += 1
        _stats.tune_s += seconds
        if seconds > SLOW_S:
            _stats.slow.append(("tune", f"{name} key={key}", seconds))


def take(group=None, device=None) -> tuple[dict, list]:
    """(the metrics since the last call: `jit_compile_s`, `jit_tune_s` as the largest over `group`'s
    ranks where one is given (every rank must call then), `jit_compiles`, `jit_tunes` this rank's;
    this rank's slow events (what, detail, seconds)), and starts afresh."""
    global _stats
    s, _stats = _stats, _Stats()
    worst = [s.compile_s, s.tune_s]
    if group is not None:
        import torch
        import torch.distributed as dist

        t = torch.tensor(worst, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        worst = t.tolist()
    return ({"jit_compile_s": worst[0], "jit_tune_s": worst[1], "jit_compiles": s.compiles, "jit_tunes": s.tunes},
            s.slow)
