"""Save and resume training state with torch.distributed.checkpoint (DCP), atomically.

A checkpoint is the folder `root/step_{step:08d}/` holding DCP's shards of the model and optimizer
state (sharded DTensors from FSDP2 stay sharded: every rank writes only its own shard), DCP's
`.metadata`, and one `extra_rank{r}.pt` per rank with that rank's small non-tensor-parallel state
(scheduler, data position, RNG). Everything is written into `step_{step:08d}.tmp/` and the folder
is renamed only after every rank has finished, so a run killed at any moment of a save leaves the
previous checkpoint as the newest complete one.

Under `parallel.dp_engine=deepspeed` the model and optimizer state is DeepSpeed's own checkpoint in
the subfolder `deepspeed/` (written by `engine.save_checkpoint`) instead of DCP's files; the extra
files, the `.tmp` folder and the rename are the same (`save_state` / `load_state`).
"""
from __future__ import annotations

import io
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_COMPLETE = re.compile(r"^step_(\d{8})$")
_METADATA = ".metadata"  # DCP writes it last, after every shard is on disk
DEEPSPEED = "deepspeed"  # the subfolder (DeepSpeed's "tag") that holds a DeepSpeed engine's state
_FIX = "delete it (or move it away) or set train.resume=none"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _extra_name(rank: int) -> str:
    return f"extra_rank{rank}.pt"


def _fsync_path(path: Path) -> None:
    # a directory's fsync makes the names inside it (and a rename into it) durable
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _COMPLETE.match(p.name)
        if m and p.is_dir() and ((p / _METADATA).is_file() or (p / DEEPSPEED).is_dir()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root, or None; `.tmp` folders and other names are ignored."""
    found = _complete_checkpoints(Path(root))
    return found[-1][1] if found else None


def _discard(path: Path) -> None:
    """Remove a folder so that a kill halfway never leaves a half-deleted checkpoint under a complete name."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + ".deleting.tmp")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _check_weights_only(extra: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(extra, buf)
    try:
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as e:  # noqa: BLE001 - the loader's own message says which type is refused
        raise TypeError(f"checkpoint extra state holds a type that torch.load(weights_only=True) refuses: {e}. "
                        "Store plain dicts/lists/numbers/strings/tensors (see capture_rng for numpy state)") from e
    return buf.getvalue()


def fsync_tree(path: Path) -> None:
    """Make every file under `path` durable (for writers that do not fsync, such as DeepSpeed's)."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_path(Path(folder))


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict,
         *, keep: int = 2) -> Path:
    """Write a checkpoint of step `step` under root, collectively on every rank; returns its folder."""
    def write(tmp: Path) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)

    return save_state(root, step, write, extra, keep=keep)


def save_state(root: Path, step: int, write_state, extra: dict, *, keep: int = 2) -> Path:
    """`save` with the model and optimizer state written by `write_state(tmp_folder)` (collective),
    which must leave it durable on disk."""
    if keep < 1:
        raise ValueError(f"keep={keep}: must be >= 1 (train.keep_checkpoints)")
    root = Path(root)
    rank, _ = _rank_world()
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    # serialising first means a bad `extra` fails before any file of this save exists
    extra_bytes = _check_weights_only(extra)

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        # left by a save of this step that was killed, possibly with another world size's extra files
        if tmp.exists():
            shutil.rmtree(tmp)
    _barrier()
    tmp.mkdir(parents=True, exist_ok=True)

    write_state(tmp)
    extra_path = tmp / _extra_name(rank)
    with open(extra_path, "wb") as f:
        f.write(extra_bytes)
        f.flush()
        os.fsync(f.fileno())
    _barrier()  # every rank's shards and extra file are durable

    if rank == 0:
        _fsync_path(tmp)
        if final.exists():
            # a re-save of the same step (e.g. after resuming from an explicit older path)
            _discard(final)
        os.replace(tmp, final)
        _fsync_path(root)
        for stale in root.glob("step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        older = [p for _, p in _complete_checkpoints(root) if p != final]
        for p in older[: max(0, len(older) - (keep - 1))]:
            _discard(p)
    _barrier()
    return final


def _problem(path: Path, rank: int, world: int, engine: str) -> str | None:
    """What makes `path` unloadable on this rank, in words, or None."""
    if not path.exists():
        return f"checkpoint {path} does not exist"
    if not path.is_dir():
        return f"checkpoint {path} is not a folder"
    if path.name.endswith(".tmp"):
        return f"checkpoint {path} is an unfinished save (a .tmp folder)"
    if engine == "deepspeed" and not (path / DEEPSPEED).is_dir():
        return (f"checkpoint {path} has no {DEEPSPEED}/ folder: it was not written with parallel.dp_engine=deepspeed; "
                "resume with the engine that wrote it")
    if engine != "deepspeed" and (path / DEEPSPEED).is_dir():
        return (f"checkpoint {path} was written with parallel.dp_engine=deepspeed; resume it with that engine "
                f"(now {engine})")
    if engine != "deepspeed" and not (path / _METADATA).is_file():
        return f"checkpoint {path} has no {_METADATA}: the save did not finish or the folder is not a DCP checkpoint"
    written_by = len(list(path.glob("extra_rank*.pt")))
    if written_by != world or not (path / _extra_name(rank)).is_file():
        return (f"checkpoint {path} was written by {written_by} ranks but this run has {world} "
                f"({_extra_name(rank)} is {'present' if (path / _extra_name(rank)).is_file() else 'missing'}); "
                "the per-rank data position and RNG state cannot be re-split: resume with the same world size")
    return None


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load model and optimizer state in place (collective) and return this rank's extra dict."""
    def read(path: Path) -> None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    return load_state(path, read, engine="fsdp2")


def load_state(path: Path, read_state, *, engine: str) -> dict:
    """`load` with the model and optimizer state read by `read_state(path)` (collective) from a
    checkpoint that parallel.dp_engine=`engine` wrote; returns this rank's extra dict."""
    path = Path(path)
    rank, world = _rank_world()
    problem = _problem(path, rank, world, engine)
    extra = None
    if problem is None:
        try:
            extra = torch.load(path / _extra_name(rank), weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file means the same thing to the user
            problem = f"checkpoint {path}: {_extra_name(rank)} is unreadable ({type(e).__name__}: {e})"
    # ranks must agree before dcp.load, or a rank that gave up would leave the others in a collective
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    problems = [p for p in problems if p]
    if problems:
        missing = not path.exists()
        err = FileNotFoundError if missing else RuntimeError
        raise err(f"{problems[0]}; {_FIX}")

    try:
        read_state(path)
    # CheckpointException derives from BaseException, not Exception: it carries every rank's failure
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - any failure here means an unreadable file
        raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({_first_failure(e)}); {_FIX}") from e
    return extra


def _first_failure(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:
        rank, wrapped = min(e.failures.items())
        e = wrapped[0] if isinstance(wrapped, tuple) else wrapped  # (exception, traceback summary)
        return f"rank {rank}: {type(e).__name__}: {str(e).strip()[:300]}"
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


def capture_rng() -> dict:
    """Every RNG a step may draw from, in types that torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            raise RuntimeError(f"checkpoint RNG state covers {len(state['cuda'])} CUDA devices but this process sees "
                               f"{torch.cuda.device_count()}; resume with the same CUDA_VISIBLE_DEVICES")
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x):
    # random.setstate insists on tuples; a round trip through other serialisers may hand back lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
