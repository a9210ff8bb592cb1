"""launcher=slurm: run as one `srun` task per GPU inside a job, or submit that job from a login node.

Inside a job step, the SLURM_* variables are mapped to the env that torch.distributed's `env://`
rendezvous reads (the same env torchrun gives a worker), USR1 is caught so that the run checkpoints
at the next step and requeues itself, and the requeued job resumes through `train.resume=auto`
(the job id, and so the default run_dir of the sbatch scripts, survives a requeue).
Outside a job, `seqpar-train launcher=slurm ...` submits `slurm/train_{single,multi}_node.sbatch`
with sbatch options taken from the launcher config and the same Hydra overrides.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from importlib.resources import as_file, files

from seqpar.config import ConfigError, validate
from seqpar.launch import stop_signal

_SCRIPTS = {False: "train_single_node.sbatch", True: "train_multi_node.sbatch"}


class SlurmEnvError(ConfigError):
    """SLURM_* variables that are missing or contradict each other; the message says which and why."""


def in_job_step(env: Mapping[str, str] = os.environ) -> bool:
    # the batch shell has SLURM_JOB_ID and even SLURM_PROCID=0, but only srun's tasks have a step id
    return "SLURM_STEP_ID" in env


def rendezvous_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The torch.distributed env (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) of this srun task."""
    def integer(name: str) -> int:
        value = env.get(name)
        if value is None:
            raise SlurmEnvError(f"{name} is not set: launcher=slurm must run as a task of `srun` inside a Slurm job "
                                "(see slurm/train_single_node.sbatch); elsewhere use launcher=local")
        if not value.isdigit():
            raise SlurmEnvError(f"{name}={value!r}: expected a non-negative integer")
        return int(value)

    job_id, rank, world, local_rank = (integer(n) for n in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
                                                                "SLURM_LOCALID"))
    step_tasks = env.get("SLURM_STEP_NUM_TASKS")
    if step_tasks is not None and step_tasks != str(world):
        raise SlurmEnvError(f"SLURM_NTASKS={world} but this srun step runs SLURM_STEP_NUM_TASKS={step_tasks}: "
                            "start the step with every task of the job (plain `srun` inside the sbatch script)")
    if rank >= world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
    if local_rank > rank:
        raise SlurmEnvError(f"SLURM_LOCALID={local_rank} exceeds SLURM_PROCID={rank}: the task layout is inconsistent")
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    return {
        "MASTER_ADDR": env.get("MASTER_ADDR") or master_addr(env),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port(job_id, restarts)),
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
    }


def master_addr(env: Mapping[str, str]) -> str:
    """The job's first node, which every task computes alike; or srun's launch node if scontrol is missing."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if nodelist and re.fullmatch(r"[\w.-]+", nodelist):
        return nodelist  # one plain host name: no need to expand a range
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"]
    raise SlurmEnvError(f"cannot tell the rendezvous host: SLURM_JOB_NODELIST={nodelist!r} (scontrol could not expand "
                        "it) and SLURM_LAUNCH_NODE_IPADDR is not set; set MASTER_ADDR in the sbatch script")


def master_port(job_id: int, restarts: int = 0) -> int:
    # below Linux's ephemeral range (32768+), so no outgoing connection holds it; a requeued job moves
    # on to the next port in case the previous run's socket still lingers in TIME_WAIT
    return 15000 + (job_id * 16 + restarts) % 15000


def check_tasks(cfg, world: int) -> None:
    """The job's task count must fill the parallel dims exactly; say how to submit if not."""
    p = cfg.parallel
    model_parallel = p.pp * p.cp * p.tp
    need = p.dp * model_parallel if p.dp != -1 else None
    if (need is not None and need != world) or world % model_parallel:
        fit = need or model_parallel
        raise ConfigError(f"SLURM_NTASKS={world} does not fit parallel.dp*pp*cp*tp={p.dp}*{p.pp}*{p.cp}*{p.tp}: "
                          f"submit {'exactly' if need else 'a multiple of'} {fit} tasks (one per GPU, "
                          "sbatch --nodes/--ntasks-per-node), or change the parallel degrees")


def run_task(cfg, run_worker: Callable) -> int:
    """In an srun task: rendezvous from SLURM_*, train, and on USR1 checkpoint and requeue the job."""
    try:
        env = rendezvous_env()
        check_tasks(cfg, int(env["WORLD_SIZE"]))
        validate(cfg, world=int(env["WORLD_SIZE"]))
    except ConfigError as e:
        print(f"seqpar: invalid configuration: {e}", file=sys.stderr)
        return 2
    os.environ.update(env)
    stop_signal.install()
    code = run_worker(cfg)
    if code == 0 and stop_signal.stopped() and env["RANK"] == "0":
        return requeue(os.environ["SLURM_JOB_ID"])
    return code


def requeue(job_id: str) -> int:
    # Slurm kills every task as soon as it accepts the requeue; save() returned on every rank first
    r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if r.returncode:
        print(f"seqpar: stopped on USR1 with a checkpoint, but `scontrol requeue {job_id}` failed: "
              f"{r.stderr.strip()}; submit the job again with the same run_dir to resume", file=sys.stderr)
        return 1
    print(f"seqpar: stopped on USR1 with a checkpoint; job {job_id} requeued and will resume from it", flush=True)
    return 0


def sbatch_options(cfg) -> list[str]:
    """sbatch options for this config; given on the command line, they override the script's #SBATCH lines."""
    l = cfg.launcher
    if l.nproc_per_node == "auto":
        raise ConfigError("launcher=slurm needs launcher.nproc_per_node=N (tasks per node, one per GPU): "
                          "a login node cannot count the compute nodes' GPUs")
    nproc = int(l.nproc_per_node)
    gpus = 0 if cfg.train.device == "cpu" else nproc
    opts = ["--parsable", f"--nodes={l.nnodes}", f"--ntasks-per-node={nproc}", f"--gpus-per-node={gpus}"]
    if l.partition:
        opts.append(f"--partition={l.partition}")
    if l.time_limit:
        opts.append(f"--time={l.time_limit}")
    return opts


def submit(cfg, overrides: list[str]) -> int:
    """From a login node: submit the sbatch script with these overrides and print the job id."""
    if os.environ.get("SLURM_JOB_ID"):
        print("seqpar: launcher=slurm in a Slurm job but outside an srun step: start it with `srun seqpar-train "
              "launcher=slurm ...` (see slurm/train_single_node.sbatch), or submit it from a login node",
              file=sys.stderr)
        return 2
    try:
        opts = sbatch_options(cfg)
    except ConfigError as e:
        print(f"seqpar: invalid configuration: {e}", file=sys.stderr)
        return 2
    with as_file(files("seqpar.slurm") / _SCRIPTS[cfg.launcher.nnodes > 1]) as script:
        cmd = ["sbatch", *opts, str(script), *overrides]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            print("seqpar: launcher=slurm needs `sbatch` on PATH (run it on a Slurm login node)", file=sys.stderr)
            return 2
    if r.returncode:
        print(f"seqpar: sbatch refused the job: {r.stderr.strip()}\n  command: {' '.join(cmd)}", file=sys.stderr)
        return r.returncode
    job_id = r.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    print(f"seqpar: submitted Slurm job {job_id}; run_dir={cfg.run_dir}; follow it with `squeue -j {job_id}`")
    return 0
