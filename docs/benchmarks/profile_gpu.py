"""Where a benchmark's time goes: run `python -m seqpar.bench <name>` with every timed case also
profiled once (torch.profiler, CUDA + CPU) and its top kernels and host ops written per case.

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/profile_gpu.py OUTDIR ring --packed-lens 65536 ...

A diagnostic beside the benchmarks (their figures stay the unprofiled ones): each rank writes
OUTDIR/profile_rank{r}.txt, one section per timed case in the order the benchmark times them,
with the case's wall time, the GPU's busy time (sum of kernel times; the rest is the GPU idling
on the host or on a peer) and the 25 ops with the most CUDA time, then the 15 with the most CPU time.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile


def _profiled(fn, out):
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    out.write(f"\n===== case {_profiled.case}: wall {wall:.2f} ms, GPU busy {busy:.2f} ms "
              f"({busy / wall:.0%}) =====\n")
    out.write(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    out.write(events.table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
    out.flush()
    _profiled.case += 1


_profiled.case = 0


def main():
    outdir, name, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(outdir, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    out = open(os.path.join(outdir, f"profile_rank{rank}.txt"), "w")
    bench = importlib.import_module(f"seqpar.bench.{name}")

    def wrap_timer(make):  # ring/disagg: timer(device, iters, warmup) -> run(fn) -> ms
        def patched(*a, **kw):
            run = make(*a, **kw)

            def timed(fn):
                ms = run(fn)
                # the ring bench's accuracy checks read (and clear) its timer's last result
                timed.last, run.last = getattr(run, "last", None), None
                _profiled(fn, out)
                return ms
            return timed
        return patched

    if hasattr(bench, "_timer"):
        bench._timer = wrap_timer(bench._timer)
    if hasattr(bench, "_timer_local"):
        bench._timer_local = wrap_timer(bench._timer_local)
    if hasattr(bench, "_time_ms"):  # lasp: _time_ms(step, device, iters, warmup, distributed) -> ms
        real = bench._time_ms

        def time_ms(step, *a, **kw):
            ms = real(step, *a, **kw)
            _profiled(step, out)
            return ms
        bench._time_ms = time_ms
    return bench.main(argv)


if __name__ == "__main__":
    sys.exit(main())
