"""Run a function on N gloo processes of this machine (the harness every multi-rank test shares),
and wait for an outside process (Slurm, Ray) to reach a state."""
from __future__ import annotations

import gc
import multiprocessing
import os
import pickle
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from a server that imported these once, not from a fresh interpreter each: on the CI's
# two cores a spawned rank spent seconds importing torch and its distributed packages, per test.
# Only libraries that read no seqpar setting at import: seqpar itself loads in the rank, after
# _worker sets the caller's environment.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.tensor",
                                        "torch.distributed.checkpoint", "torch.distributed.fsdp", "omegaconf", "hydra"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, backend, fn, args, environ):
    # the fork server's environment is the one it started with; the caller's is the one a test set
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        gc.collect()  # FSDP2 hooks must go before the gloo group does, or gloo aborts at exit
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, backend: str = "gloo"):
    """fn(rank, world_size, *args) on every rank; returns the list of per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, free_port(), out_dir, backend, fn, args, dict(os.environ)),
                           nprocs=world_size, join=True, start_method="forkserver")
        results = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def wait_until(ready, timeout: float, interval: float = 0.5) -> bool:
    """Poll `ready()` until it is true (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return True
        time.sleep(interval)
    return False
