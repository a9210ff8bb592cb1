"""Bandwidth and latency of each collective seqpar issues vs message size, on the ranks torchrun starts.

`torchrun --nproc_per_node N -m seqpar.bench comm --out FILE.json` times all_reduce, all_gather
(into one tensor), reduce_scatter (from one tensor), all_to_all_single and a send/recv pair to
the ring neighbours (one ring step), for per-rank buffers of 4 KiB .. 256 MiB (x4 steps), and
writes nccl-tests' figures: time, algorithm bandwidth (bytes / time) and bus bandwidth (the
link's, after the algorithm's (n-1)/n factors). `seqpar.sim` fits its intra-node alpha-beta on
these rows. Without CUDA it runs on gloo with tiny sizes (the CPU test's smoke form); an op the
backend lacks gets an `error` row instead of a time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torch.distributed as dist

from seqpar.parallel.dims import init_world

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def _bus_factor(op: str, n: int) -> float:
    return {"all_reduce": 2 * (n - 1) / n, "send_recv": 1.0}.get(op, (n - 1) / n)


def _call(op: str, nbytes: int, device, world: int, rank: int):
    """A closure running one `op` on a per-rank buffer of `nbytes` (nccl-tests' size convention)."""
    elems = max(world, nbytes // 2 // world * world)  # bf16 elements, divisible by the world
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type != "cuda":
        elems = max(world, nbytes // 4 // world * world)
    buf = torch.ones(elems, dtype=dtype, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(buf)
    if op == "all_gather":
        part = buf[: elems // world]
        return lambda: dist.all_gather_into_tensor(buf, part)
    if op == "reduce_scatter":
        part = torch.empty(elems // world, dtype=dtype, device=device)
        return lambda: dist.reduce_scatter_tensor(part, buf)
    if op == "all_to_all":
        out = torch.empty_like(buf)
        return lambda: dist.all_to_all_single(out, buf)
    recv = torch.empty_like(buf)
    nxt, prv = (rank + 1) % world, (rank - 1) % world

    def ring_step():
        ops = [dist.P2POp(dist.isend, buf, nxt), dist.P2POp(dist.irecv, recv, prv)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return ring_step


def _time(fn, device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    elapsed = (time.perf_counter() - start) / iters
    slowest = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 4
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m seqpar.bench comm", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--min-bytes", type=int, default=None, help="default 4 KiB (CUDA), 4 KiB (CPU)")
    p.add_argument("--max-bytes", type=int, default=None, help="default 256 MiB (CUDA), 64 KiB (CPU)")
    p.add_argument("--ops", nargs="*", default=list(OPS), choices=OPS)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = init_world(cuda)
    world, rank = dist.get_world_size(), dist.get_rank()
    lo = args.min_bytes or 4096
    hi = args.max_bytes or (256 * 2**20 if cuda else 64 * 1024)
    iters, warmup = args.iters or (20 if cuda else 3), args.warmup or (5 if cuda else 1)
    rows = []
    try:
        for op in args.ops:
            for nbytes in sizes(lo, hi):
                row = dict(op=op, bytes=nbytes, world=world)
                try:
                    fn = _call(op, nbytes, device, world, rank)
                    # big messages need fewer repetitions for a stable mean; small ones more
                    n = iters if nbytes < 64 * 2**20 else max(3, iters // 4)
                    t = _time(fn, device, n, warmup)
                    row.update(time_s=t, algbw_GBps=round(nbytes / t / 1e9, 3),
                               busbw_GBps=round(nbytes * _bus_factor(op, world) / t / 1e9, 3))
                except (RuntimeError, NotImplementedError, ValueError) as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
                if "error" in row:
                    break  # the backend lacks this op: the larger sizes would fail the same way
        if rank == 0:
            result = dict(benchmark="comm", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
                          backend=dist.get_backend(), world=world, torch=torch.__version__,
                          nccl=".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                          convention="bytes = per-rank buffer (nccl-tests): all_gather output, reduce_scatter input, "
                                     "all_to_all send buffer, send_recv message", rows=rows)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0
