"""launcher=ray: one Ray actor per rank in one placement group; restart from a checkpoint on worker loss.

Ray does placement and restart only. Each actor starts the worker entry point torchrun would start
(`python -m seqpar.train ...`) with the env torchrun would give it (MASTER_ADDR/PORT, RANK,
WORLD_SIZE, LOCAL_RANK), so a rank under Ray trains exactly like a local one. The workers' output
reaches this driver (and `ray job logs`) through Ray's log forwarding. When an actor dies (a lost
node, a killed process) the whole group is torn down and started again; `train.resume=auto` makes
the new group resume from the newest complete checkpoint in run_dir, which must be storage every
node sees. A worker that exits with an error (a bug, a bad config) fails the run without restarts.
"""
from __future__ import annotations

import ctypes
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from seqpar import checkpoint
from seqpar.config import world_size

_GRACE_S = 30  # after one rank fails, how long the others get to notice (a broken collective) and exit


class RayLaunchError(RuntimeError):
    """The cluster cannot run this job (unreachable, too small); the message says what to change."""


class RankWorker:
    """The body of one rank's actor: runs the worker process and reports its exit status."""

    def placement(self) -> tuple[str, str, list[str]]:
        import ray
        ctx = ray.get_runtime_context()
        return ray.util.get_node_ip_address(), ctx.get_node_id(), [str(g) for g in ctx.get_accelerator_ids()["GPU"]]

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, argv: list[str], env: dict[str, str]) -> int:
        # through this module's __main__, so that the rank's process dies with this actor
        cmd = [sys.executable, "-m", "seqpar.launch.ray", str(os.getpid()), *argv]
        return subprocess.Popen(cmd, env={**os.environ, **env}).wait()


def _run_rank(actor_pid: int) -> None:
    """The rank's process: die with the actor that started it, then run `python -m seqpar.train`.

    A killed actor must not leave its training process behind, holding the GPU and the rendezvous.
    PR_SET_PDEATHSIG is set here, after exec, because a preexec_fn is not fork-safe in Ray's
    multithreaded worker process."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != actor_pid:  # the actor died before prctl took effect
            sys.exit(1)
    sys.argv[0] = "seqpar.train"
    runpy.run_module("seqpar.train", run_name="__main__", alter_sys=True)


def connect(address: str) -> None:
    """ray.init on an existing cluster, failing fast with a message instead of Ray's long retry loop."""
    import ray
    if address != "auto":
        parsed = urlparse(address if "://" in address else f"tcp://{address}")
        try:
            socket.create_connection((parsed.hostname, parsed.port or 6379), timeout=5).close()
        except OSError as e:
            raise RayLaunchError(f"launcher.address={address}: no Ray cluster answers there ({e.strerror or e}); "
                                 "start one with `ray start --head` or give the head's HOST:PORT") from None
    try:
        ray.init(address=address, log_to_driver=True, logging_level="WARNING")
    except ConnectionError as e:
        raise RayLaunchError(f"launcher.address={address}: {e}. Start a cluster with `ray start --head`, "
                             "submit with `ray job submit`, or set launcher.address=HOST:PORT") from None


def bundle_for(cfg) -> dict[str, float]:
    import ray
    gpu = cfg.train.device == "cuda" or (cfg.train.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    return {"CPU": cfg.launcher.cpus_per_worker, **({"GPU": 1} if gpu else {})}


def reserve(cfg, bundle: dict[str, float], world: int):
    """A ready placement group of `world` bundles, or RayLaunchError saying why none fits."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    l = cfg.launcher
    total = ray.cluster_resources()
    for resource, amount in bundle.items():
        if total.get(resource, 0) < amount * world:
            raise RayLaunchError(f"no placement for {world} ranks of {bundle}: the cluster has {total.get(resource, 0):g} "
                                 f"{resource} in all; lower launcher.nproc_per_node x launcher.nnodes={world} or "
                                 "launcher.cpus_per_worker, or add nodes")
    nodes = sum(1 for n in ray.nodes() if n["Alive"])
    if l.placement_strategy == "STRICT_SPREAD" and nodes < world:
        raise RayLaunchError(f"launcher.placement_strategy=STRICT_SPREAD puts each of {world} ranks on its own node "
                             f"but the cluster has {nodes}; use PACK or SPREAD, or add nodes")
    pg = placement_group([dict(bundle) for _ in range(world)], strategy=l.placement_strategy)
    ready, _ = ray.wait([pg.ready()], timeout=l.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RayLaunchError(f"no free placement for {world} x {bundle} ({l.placement_strategy}) within "
                             f"launcher.placement_timeout_s={l.placement_timeout_s:g}: other jobs hold "
                             f"{ray.available_resources()} free of {total}")
    return pg


def start_group(pg, bundle: dict[str, float], world: int) -> tuple[list, list[dict[str, str]]]:
    """One actor per bundle, and each rank's env; ranks are numbered node by node, so that the
    innermost parallel dims (tp, then cp) stay within a node."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
    remote = ray.remote(RankWorker)
    actors = [remote.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                             scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
              .remote() for i in range(world)]
    where = ray.get([a.placement.remote() for a in actors])  # the bundles are reserved: this cannot wait long
    node_order = list(dict.fromkeys(node for _, node, _ in where))
    order = sorted(range(world), key=lambda i: (node_order.index(where[i][1]), i))
    actors, where = [actors[i] for i in order], [where[i] for i in order]
    # every rank of a node sees all of the node's GPUs (as under torchrun), so NCCL can use peer-to-peer
    node_gpus = {node: sorted({g for _, n, gpus in where if n == node for g in gpus}, key=lambda g: (len(g), g))
                 for node in node_order}  # numeric ids in numeric order; UUIDs sort too
    master_addr, master_port = where[0][0], ray.get(actors[0].free_port.remote())
    envs = []
    for rank, (_, node, gpus) in enumerate(where):
        local_rank = [n for _, n, _ in where[:rank]].count(node)
        env = {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank), "OMP_NUM_THREADS": str(int(bundle["CPU"]))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus[node])
            env["LOCAL_RANK"] = str(node_gpus[node].index(gpus[0]))
        envs.append(env)
    return actors, envs


def run_group(actors, envs, argv: list[str]) -> tuple[bool, int]:
    """Run every rank to the end; returns (a worker was lost, the first non-zero exit status)."""
    import ray
    pending = {actor.run.remote(argv, env): rank for rank, (actor, env) in enumerate(zip(actors, envs))}
    lost, failed, deadline = False, 0, None
    while pending:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not done:  # the survivors of a failure hang in a collective: stop waiting for them
            break
        rank = pending.pop(done[0])
        try:
            code = ray.get(done[0])
        except ray.exceptions.RayActorError as e:
            print(f"seqpar: rank {rank}'s Ray actor died ({type(e).__name__})", file=sys.stderr, flush=True)
            lost = True
        else:
            if code < 0:  # killed by a signal (the OOM killer, a node agent): lost like a dead actor
                print(f"seqpar: rank {rank}'s worker process was killed by signal {-code}", file=sys.stderr, flush=True)
                lost = True
            failed = failed or code
        if (lost or failed) and deadline is None:
            deadline = time.monotonic() + _GRACE_S
    return lost, failed


def launch(cfg, argv: list[str]) -> int:
    """The driver: reserve, start, watch; after a worker loss, tear down and start again from the checkpoint."""
    import ray
    from ray.util.placement_group import remove_placement_group
    world = world_size(cfg)
    ckpt_root = Path(cfg.run_dir).absolute() / "checkpoints"
    try:
        connect(cfg.launcher.address)
        bundle = bundle_for(cfg)
        for attempt in range(cfg.launcher.max_restarts + 1):
            pg = reserve(cfg, bundle, world)
            try:
                actors, envs = start_group(pg, bundle, world)
                # after a loss, resume from the newest checkpoint even if the first attempt was told otherwise
                lost, failed = run_group(actors, envs, argv if attempt == 0 else [*argv, "train.resume=auto"])
                for actor in actors:
                    ray.kill(actor)  # also ends survivors stuck in a collective with the lost rank
            finally:
                remove_placement_group(pg)
            if not lost:
                return failed
            if attempt < cfg.launcher.max_restarts:
                print(f"seqpar: restart {attempt + 1}/{cfg.launcher.max_restarts} of all {world} ranks from "
                      f"{checkpoint.latest(ckpt_root) or 'the start (no checkpoint yet)'}", file=sys.stderr, flush=True)
    except RayLaunchError as e:
        print(f"seqpar: {e}", file=sys.stderr)
        return 2
    print(f"seqpar: a worker was lost {cfg.launcher.max_restarts + 1} times; giving up (launcher.max_restarts="
          f"{cfg.launcher.max_restarts}). The newest checkpoint stays in {ckpt_root}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    _run_rank(int(sys.argv.pop(1)))
