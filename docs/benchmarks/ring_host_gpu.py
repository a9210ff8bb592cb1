"""How long the GPU waits for the host at the start of a 2-rank ring's fwd+bwd (issue 3's 32k figure).

    SEQPAR_ATTN_KERNEL=flash SEQPAR_RING_KEEP_KV=1 torchrun --nproc_per_node 2 docs/benchmarks/ring_host_gpu.py OUT

The benchmark times a step from an event recorded before the call: the GPU idles until the host
has planned the call and launched its first kernel. Per rank, for the one-GPU step (SDPA) and the
ring: the GPU time from that event to an event recorded just before the first attention kernel's
launch (`first_kernel_gap_ms`, median of 10), the host's time to launch the whole fwd+bwd
(`host_ms`), and a cProfile of 10 ring steps' host work (top functions by cumulative time, in OUT.prof.txt).
"""
import cProfile
import io
import json
import pstats
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ring_profile_gpu import setup  # docs/benchmarks, this script's folder
from seqpar.attention import ring as ring_module


def gaps(fn, hook_owner, hook_name, iters=10):
    """(median first-kernel gap ms, median host launch ms) of fn, the gap marked by an event recorded
    at the first call of hook_owner.hook_name in each step."""
    real = getattr(hook_owner, hook_name)
    marks = []

    def hooked(*a, **kw):
        if marks and not marks[-1]:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks[-1].append(ev)
        return real(*a, **kw)
    setattr(hook_owner, hook_name, hooked)
    try:
        fn()
        torch.cuda.synchronize()
        gap, host = [], []
        for _ in range(iters):
            marks.append([])
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            t = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t) * 1e3)
            torch.cuda.synchronize()
            gap.append(start.elapsed_time(marks[-1][0]))
    finally:
        setattr(hook_owner, hook_name, real)
    return round(statistics.median(gap), 3), round(statistics.median(host), 3)


def main():
    rank, _, kernel, single, ring = setup()
    row = dict(rank=rank, kernel=kernel)
    row["single_first_kernel_gap_ms"], row["single_host_ms"] = gaps(single, torch.nn.functional,
                                                                    "scaled_dot_product_attention")
    row["ring_first_kernel_gap_ms"], row["ring_host_ms"] = gaps(ring, ring_module, "flash_attn")
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(10):
        ring()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    with open(f"{sys.argv[1]}.rank{rank}.prof.txt", "w") as f:
        f.write(text.getvalue())
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(f"{sys.argv[1]}.json", "w") as f:
            json.dump(rows, f, indent=1)
        for r in rows:
            print(json.dumps(r))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
