"""Where a 2-rank ring's fwd+bwd at 32k spends its GPU time beyond one GPU's half (issue 3's last 5%).

    SEQPAR_ATTN_KERNEL=flash SEQPAR_RING_KEEP_KV=1 torchrun --nproc_per_node 2 docs/benchmarks/ring_profile_gpu.py OUT.json

Per rank, for the one-GPU 32k fwd+bwd (SDPA, the bench's `_single`), the ring without transfers
(`compute_only`, the bench's `_NoComm`) and the ring: ms per step (CUDA events, median of 10), and
from torch.profiler over 3 steps: each kernel name's total ms per step, the sum of all kernels
per step, the step's span from its first kernel's start to its last kernel's end (kernels of
every stream: a span above the sum is idle time or time spent waiting on a transfer; below it,
kernels overlapped) and the first step's kernels of 50 us or more as (name, start ms, ms), in time
order (a NCCL kernel's ms include its wait for the peer). bf16, H=32, D=128, zigzag, causal.
"""
import collections
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from seqpar.bench import ring as bench
from seqpar.parallel.sharding import shard_sequence

S, H, D = 32768, 32, 128


def kernel_table(fn, steps=3):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    totals = collections.defaultdict(float)
    for e in events:
        totals[e.name[:90]] += e.device_time / 1e3 / steps
    start = min(e.time_range.start for e in events)
    end = max(e.time_range.end for e in events)
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:25]
    # the first step's longer kernels in time order: which run beside which (NCCL's beside attention's)
    first = [e for e in events if e.time_range.start < start + (end - start) / steps and e.device_time >= 50]
    timeline = [(e.name[:60], round((e.time_range.start - start) / 1e3, 3), round(e.device_time / 1e3, 3))
                for e in sorted(first, key=lambda e: e.time_range.start)]
    return dict(kernel_ms_per_step=round(sum(totals.values()), 3), span_ms_per_step=round((end - start) / 1e3 / steps, 3),
                kernels={name: round(ms, 3) for name, ms in top}, first_step=timeline)


def setup():
    """Joins the NCCL world; (rank, device, kernel family, the one-GPU step, the ring's step) at 32k,
    the bench's inputs and calls (`bench ring`'s `_single` and `_ring_step`)."""
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    kernel = os.environ.get("SEQPAR_ATTN_KERNEL", "flash")
    g = torch.Generator(device=device).manual_seed(S)
    q, k, v, do = (torch.randn(1, S, H, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4))
    local = [shard_sequence(t, layout="zigzag") for t in (q, k, v, do)]
    return rank, device, kernel, lambda: bench._single(q, k, v, do, kernel, device), lambda: bench._ring_step(*local)


def main():
    rank, device, kernel, single, ring = setup()
    timer = bench._timer(device, 10, 3)
    cases = {"single": single, "ring": ring}
    row = dict(rank=rank, kernel=kernel, keep=os.environ.get("SEQPAR_RING_KEEP_KV", "0"))
    for name, fn in cases.items():
        row[f"{name}_ms"] = timer(fn)
        row[name] = kernel_table(fn)
        if name == "ring":
            with bench._without_comm():
                row["compute_only_ms"] = timer(fn)
                row["compute_only"] = kernel_table(fn)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(rows, f, indent=1)
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if not isinstance(v, dict)}))
            for name in ("single", "compute_only", "ring"):
                print(name, r[name]["kernel_ms_per_step"], r[name]["span_ms_per_step"])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
