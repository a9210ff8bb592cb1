"""Where LASP-2's host time goes, backward included (issue 4, twenty-fourth session). The autograd
engine runs a CUDA backward on its own device thread, which `lasp_host.py`'s cProfile (main thread only)
never saw. Here, per rank, for the kernel alone and LASP-2 at LOCAL_TOKENS per GPU (H=32, D=128, bf16):
host and wall ms per fwd+bwd over 30 steady steps with the engine's threads (torch's default) and without
(`torch.autograd.set_multithreading_enabled(False)`: the backward runs in the calling thread); then
rank 0's cProfile of 30 steps without them (the whole fwd+bwd in one thread): top functions by own time
and by cumulative time.

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host_profile_gpu.py OUT.json [LOCAL_TOKENS]
"""
import cProfile
import io
import json
import pstats
import sys
import time

import torch
import torch.distributed as dist

from lasp_host import layer_inputs  # this folder's (scripts run from it)
from seqpar import kernels
from seqpar.attention import lasp2_attention
from seqpar.parallel.dims import init_world


def main(out, local):
    device = init_world(True)
    rank = dist.get_rank()
    lam, q, k, v, do = layer_inputs(device, rank, local)
    fns = {"kernel_alone": lambda: kernels.lightning_attn(q, k, v, lam)[0],
           "lasp2": lambda: lasp2_attention(q, k, v, log_decay=lam)}
    result = {}

    def steps(fn, n):
        for _ in range(n):
            for t in (q, k, v):
                t.grad = None
            fn().backward(do)

    for name, fn in fns.items():
        for threads in (True, False):
            with torch.autograd.set_multithreading_enabled(threads):
                steps(fn, 10)
                torch.cuda.synchronize()
                dist.barrier()
                t0 = time.perf_counter()
                steps(fn, 30)
                host = (time.perf_counter() - t0) * 1e3 / 30
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t0) * 1e3 / 30
            result[f"{name} {'engine threads' if threads else 'one thread'}"] = dict(host_ms=round(host, 4),
                                                                                      wall_ms=round(wall, 4))
        with torch.autograd.set_multithreading_enabled(False):
            torch.cuda.synchronize()
            dist.barrier()
            prof = cProfile.Profile()
            prof.enable()
            steps(fn, 30)
            prof.disable()
            torch.cuda.synchronize()
        if rank == 0:
            for order in ("tottime", "cumtime"):
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats(order).print_stats(40)
                result[f"{name} cprofile {order}"] = s.getvalue()[-9000:]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, {k: v for k, v in result.items() if "cprofile" not in k})
    if rank == 0:
        result["ranks"] = every
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        for r, res in enumerate(every):
            print(f"rank {r}", json.dumps(res))
        for key, text in result.items():
            if "cprofile" in key:
                print(f"===== {key}\n{text[:7000]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768)
