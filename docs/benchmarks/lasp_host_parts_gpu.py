"""Where LASP-2's host time goes (issue 4). At 32k tokens per GPU LASP-2 is host-bound: 2.3-2.5 ms of host
per fwd+bwd against 2.43-2.48 ms of GPU compute, the kernel alone 1.16 ms of host
(`lasp_hostwait_gpu.py`, 2026-11-28). Per rank, over 30 steady steps: the host time inside each piece of
the path (wrapped with perf_counter; nested pieces count inside their parents too), per step, for
LASP-2 and for the kernel alone.

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host_parts_gpu.py OUT.json [LOCAL_TOKENS]
"""
import functools
import json
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from lasp_host import layer_inputs  # this folder's (scripts run from it)
from seqpar import kernels
from seqpar.attention import lasp, state_scan
from seqpar.attention import lasp2_attention
from seqpar.kernels.lightning_attn import triton as lt
from seqpar.parallel.dims import init_world

SPENT = defaultdict(float)


def _wrap(owner, name, label):
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SPENT[label] += time.perf_counter() - t0
    setattr(owner, name, timed)


PIECES = [
    (lasp, "lasp_attention", "lasp_attention (forward, whole)"),
    (lasp, "_cut", "lasp._cut"),
    (lasp, "_chain", "lasp._chain"),
    (lasp, "group_size_rank", "group_size_rank"),
    (lasp, "_chunk_states", "lasp._chunk_states"),
    (lasp, "_to_slots", "lasp._to_slots"),
    (lasp, "start_scan", "start_scan (posts the all-gather)"),
    (state_scan.dist, "all_gather_into_tensor", "dist.all_gather_into_tensor"),
    (state_scan._Gathered, "wait", "_Gathered.wait (settle + einsum)"),
    (state_scan._Gathered, "settle", "_Gathered.settle"),
    (lt, "_exchange_start", "triton._exchange_start"),
    (lt, "_exchange_wait", "triton._exchange_wait"),
    (lt, "_segment_locals", "triton._segment_locals (state launch)"),
    (lt, "_scan", "triton._scan (scan launch)"),
    (lt, "_boundary_states", "triton._boundary_states"),
    (lt, "_output", "triton._output (output launch)"),
    (lt, "segment_table", "triton.segment_table"),
    (lt, "lightning_attn_triton", "triton.lightning_attn_triton (forward, whole)"),
    (lasp, "_kernel", "lasp._kernel"),
]


def main(out, local):
    device = init_world(True)
    rank, world = dist.get_rank(), dist.get_world_size()
    if hasattr(state_scan.dist, "all_gather_single"):
        PIECES.append((state_scan.dist, "all_gather_single", "dist.all_gather_single"))
    for owner, name, label in PIECES:
        _wrap(owner, name, label)
    lam, q, k, v, do = layer_inputs(device, rank, local)
    fns = {"lasp2": lambda: lasp2_attention(q, k, v, log_decay=lam),
           "kernel_alone": lambda: kernels.lightning_attn(q, k, v, lam)[0]}
    result = {}
    for name, fn in fns.items():
        def step():
            for t in (q, k, v):
                t.grad = None
            fn().backward(do)
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        SPENT.clear()
        n = 30
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        host = (time.perf_counter() - t0) * 1e3 / n
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / n
        result[name] = dict(host_ms=round(host, 4), wall_ms=round(wall, 4),
                            parts_us=dict(sorted(((k, round(v * 1e6 / n, 1)) for k, v in SPENT.items()),
                                                 key=lambda kv: -kv[1])))
    every = [None] * world
    dist.all_gather_object(every, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(local_tokens=local, device=torch.cuda.get_device_name(), ranks=every), f, indent=1)
        for r, res in enumerate(every):
            for name, x in res.items():
                print(f"rank {r} {name}: host {x['host_ms']} ms, wall {x['wall_ms']} ms per step")
                for label, us in x["parts_us"].items():
                    print(f"     {us:9.1f} us  {label}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768)
