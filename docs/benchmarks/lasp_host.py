"""Is LASP-2 on 2 GPUs host-bound at 32k tokens per GPU? (issue 4: 64k total, efficiency 0.70-0.82
while the kernel alone is flat). Per rank: the mean ms of 50 back-to-back fwd+bwd steps of one
layer (H=32, D=128, bf16) for LASP-2 and for the plain kernel on the same local length, the host
time of enqueuing them (no sync inside), and rank 0's cProfile of 20 steps (top functions by own time).

    torchrun --standalone --nproc_per_node 2 docs/benchmarks/lasp_host.py OUTDIR [LOCAL_TOKENS]
"""
import cProfile
import io
import json
import pstats
import sys
import time

import torch
import torch.distributed as dist

from seqpar import kernels
from seqpar.attention import lasp2_attention
from seqpar.parallel.dims import init_world


def _steps(fn, q, k, v, do, n):
    for _ in range(n):
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(do)


def layer_inputs(device, rank, local, H=32, D=128):
    """One linear-attention layer's inputs on this rank (the other lasp_*_gpu.py scripts use them too):
    the decays of the anchors, q, k, v (requiring grad) and dO, bf16 `[1, local, H, D]`."""
    lam = -torch.linspace(1, 8, H, device=device).exp2().reciprocal()
    gen = torch.Generator(device=device).manual_seed(rank)
    q, k, v, do = (torch.randn(1, local, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    return lam, q, k, v, do


def main(out_dir, local):
    device = init_world(True)
    rank = dist.get_rank()
    lam, q, k, v, do = layer_inputs(device, rank, local)
    fns = {"lasp2": lambda a, b, c: lasp2_attention(a, b, c, log_decay=lam),
           "kernel_alone": lambda a, b, c: kernels.lightning_attn(a, b, c, lam)[0]}
    result = {}
    for name, fn in fns.items():
        _steps(fn, q, k, v, do, 5)
        torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        _steps(fn, q, k, v, do, 50)
        host = (time.perf_counter() - t0) * 1e3 / 50
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / 50
        result[name] = dict(ms=round(wall, 4), host_enqueue_ms=round(host, 4))
        if rank == 0:
            prof = cProfile.Profile()
            prof.enable()
        _steps(fn, q, k, v, do, 20)
        if rank == 0:
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
            result[name]["cprofile_top"] = s.getvalue()[-6000:]
        torch.cuda.synchronize()
        dist.barrier()
    if rank == 0:
        with open(f"{out_dir}/lasp_host.json", "w") as f:
            json.dump(result, f, indent=1)
        for name, r in result.items():
            print(name, r["ms"], "ms per step, host", r["host_enqueue_ms"], "ms")
            print(r["cprofile_top"][:3500])
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32768)
