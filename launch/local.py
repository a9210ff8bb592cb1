"""Local launcher: start `nproc_per_node` workers of `python -m seqpar.train` through torch's
elastic agent (torchrun), which wires the rendezvous and the RANK/WORLD_SIZE/LOCAL_RANK env."""
from __future__ import annotations

import os
import subprocess
import sys


def launch_workers(argv: list[str], *, nproc_per_node: int, nnodes: int = 1, master_addr: str = "127.0.0.1",
                   master_port: int = 0) -> int:
    """Run the workers to the end; returns the exit code (non-zero if any worker failed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}", f"--nnodes={nnodes}"]
    if nnodes == 1 and master_port == 0:
        cmd.append("--standalone")  # picks a free port itself
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port or 29500}"]
    cmd += ["-m", "seqpar.train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per CPU worker; torch would take all of them in each
    return subprocess.call(cmd, env=env)


def is_worker() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
