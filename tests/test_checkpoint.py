"""DCP save/load on gloo ranks: exact round trips (plain and FSDP2), atomicity under SIGKILL, clear errors."""
from __future__ import annotations

import gc
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from seqpar import checkpoint
from tests.distributed import run_distributed


def _model_and_optimizer(fsdp: bool, seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).double()
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _train(model, optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g, dtype=torch.float64)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _snapshot(model, optimizer) -> dict:
    """Full (unsharded) copies of every parameter and optimizer tensor, keyed by parameter name."""
    full = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = {}
    for p, s in optimizer.state.items():
        for k, v in s.items():
            opt[f"{names[id(p)]}.{k}"] = full(v) if torch.is_tensor(v) else v
    return {"params": {n: full(p) for n, p in model.named_parameters()}, "optim": opt}


def _assert_same(a: dict, b: dict) -> None:
    for part in ("params", "optim"):
        assert a[part].keys() == b[part].keys(), part
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)


def _round_trip(rank, world, root, fsdp):
    files = _round_trip_checks(rank, world, root, fsdp)
    # FSDP modules sit in reference cycles; unless they are collected here, the gloo group outlives
    # destroy_process_group and a gloo worker thread may free its last work item (which holds a Python
    # object) during interpreter shutdown, aborting with "terminate called without an active exception"
    gc.collect()
    return files


def _round_trip_checks(rank, world, root, fsdp):
    root = Path(root)
    model, opt = _model_and_optimizer(fsdp, seed=0)
    # a plain model is replicated, so its ranks must see the same data (DCP saves one copy of it)
    data_seed = rank if fsdp else 0
    _train(model, opt, 2, seed=data_seed)
    extra = {"step": 2, "scheduler": {"last_epoch": 2, "base_lrs": [1e-2]}, "data": {"cursor": 17 + rank},
             "rng": checkpoint.capture_rng()}
    path = checkpoint.save(root, 2, model, opt, extra)
    before = _snapshot(model, opt)
    draws = (random.random(), float(np.random.rand()), torch.rand(3))

    fresh, fresh_opt = _model_and_optimizer(fsdp, seed=1)  # different init: the load must overwrite it
    assert checkpoint.latest(root) == path
    got = checkpoint.load(path, fresh, fresh_opt)
    checkpoint.restore_rng(got["rng"])
    _assert_same(before, _snapshot(fresh, fresh_opt))
    assert got["data"] == {"cursor": 17 + rank} and got["scheduler"] == extra["scheduler"]
    assert random.random() == draws[0] and float(np.random.rand()) == draws[1] and torch.equal(torch.rand(3), draws[2])

    # one more step continues identically from the loaded state
    _train(model, opt, 1, seed=100 + data_seed)
    _train(fresh, fresh_opt, 1, seed=100 + data_seed)
    _assert_same(_snapshot(model, opt), _snapshot(fresh, fresh_opt))
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("world,fsdp", [(1, False), (2, False), (2, True)])
def test_round_trip_is_exact(tmp_path, world, fsdp):
    files, *_ = run_distributed(_round_trip, world, str(tmp_path), fsdp)
    assert ".metadata" in files and {f"extra_rank{r}.pt" for r in range(world)} <= set(files)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]


def _save_then_die(rank, world, root, die_at):
    root = Path(root)
    model, opt = _model_and_optimizer(False, seed=0)
    _train(model, opt, 1, seed=0)
    checkpoint.save(root, 1, model, opt, {"step": 1})
    _train(model, opt, 1, seed=1)
    if rank == 0:
        def die(*_, **__):
            os.kill(os.getpid(), signal.SIGKILL)
        # files of step 2 are written (or being written) when the process dies
        if die_at == "rename":
            checkpoint.os.replace = die
        else:
            real = checkpoint.dcp.save

            def save_then_die(*a, **k):
                real(*a, **k)
                die()
            checkpoint.dcp.save = save_then_die
    checkpoint.save(root, 2, model, opt, {"step": 2})


def _load_step(rank, world, root):
    model, opt = _model_and_optimizer(False, seed=5)
    path = checkpoint.latest(Path(root))
    return path.name, checkpoint.load(path, model, opt)["step"]


@pytest.mark.parametrize("world,die_at", [(2, "rename"), (2, "after_dcp")])
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, world, die_at):
    with pytest.raises(mp.ProcessExitedException):
        run_distributed(_save_then_die, world, str(tmp_path), die_at)
    assert (tmp_path / "step_00000002.tmp").is_dir() and not (tmp_path / "step_00000002").exists()
    assert run_distributed(_load_step, world, str(tmp_path)) == [("step_00000001", 1)] * world


def _save_steps(rank, world, root, steps, keep):
    model, opt = _model_and_optimizer(False, seed=0)
    for s in steps:
        checkpoint.save(Path(root), s, model, opt, {"step": s}, keep=keep)


def _prune_and_resave(rank, world, root):
    _save_steps(rank, world, root, [2, 3, 4, 5], 2)
    _save_steps(rank, world, Path(root) / "again", [3, 3], 1)


def test_pruning_keeps_newest_and_sweeps_tmp(tmp_path):
    (tmp_path / "step_00000001.tmp").mkdir(parents=True)  # a killed save
    (tmp_path / "notes").mkdir()
    run_distributed(_prune_and_resave, 2, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "notes", "step_00000004", "step_00000005"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000005"
    # a re-save of an existing step replaces it instead of failing on a non-empty rename target
    assert [p.name for p in (tmp_path / "again").iterdir()] == ["step_00000003"]


def test_latest_ignores_incomplete_and_missing(tmp_path):
    assert checkpoint.latest(tmp_path / "nothing") is None
    (tmp_path / "step_00000009.tmp").mkdir()
    (tmp_path / "step_00000009.tmp" / ".metadata").touch()
    (tmp_path / "step_00000008").mkdir()  # no .metadata: not complete
    (tmp_path / "step_00000003").mkdir()
    (tmp_path / "step_00000003" / ".metadata").touch()
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000003"


def _load_error(path) -> tuple[str, str] | None:
    model, opt = _model_and_optimizer(False, seed=0)
    try:
        checkpoint.load(Path(path), model, opt)
    except (RuntimeError, FileNotFoundError) as e:
        return type(e).__name__, str(e)
    return None


def _single_rank_errors(rank, world, root):
    root = Path(root)
    _save_steps(rank, world, root / "no_meta", [1], 1)
    (root / "no_meta" / "step_00000001" / ".metadata").unlink()
    return [_load_error(root / "absent"), _load_error(root / "two" / "step_00000001"),
            _load_error(root / "no_meta" / "step_00000001")]


def _two_rank_errors(rank, world, root, stage):
    root = Path(root)
    if stage == "save":
        for name in ("two", "truncated", "bad_extra"):
            _save_steps(rank, world, root / name, [1], 1)
        return None
    return [_load_error(root / name / "step_00000001") for name in ("truncated", "bad_extra")]


def test_bad_checkpoints_fail_with_path_and_fix(tmp_path):
    run_distributed(_two_rank_errors, 2, str(tmp_path), "save")
    for shard in (tmp_path / "truncated" / "step_00000001").glob("*.distcp"):  # as after a full disk
        shard.write_bytes(shard.read_bytes()[:40])
    (tmp_path / "bad_extra" / "step_00000001" / "extra_rank1.pt").write_bytes(b"garbage")

    absent, other_world, no_meta = run_distributed(_single_rank_errors, 1, str(tmp_path))[0]
    assert absent[0] == "FileNotFoundError" and str(tmp_path / "absent") in absent[1]
    assert "train.resume=none" in absent[1]
    assert other_world[0] == "RuntimeError" and "written by 2 ranks but this run has 1" in other_world[1]
    assert str(tmp_path / "two" / "step_00000001") in other_world[1]
    assert no_meta[0] == "RuntimeError" and "no .metadata" in no_meta[1] and "delete it" in no_meta[1]

    for truncated, bad_extra in run_distributed(_two_rank_errors, 2, str(tmp_path), "load"):
        assert truncated[0] == "RuntimeError" and "corrupt or truncated" in truncated[1]
        assert str(tmp_path / "truncated" / "step_00000001") in truncated[1]
        assert bad_extra[0] == "RuntimeError" and "extra_rank1.pt is unreadable" in bad_extra[1]  # both ranks raise


def _save_numpy_extra(rank, world, root):
    model, opt = _model_and_optimizer(False, seed=0)
    try:
        checkpoint.save(Path(root), 1, model, opt, {"state": np.zeros(3)})
    except TypeError as e:
        return str(e), sorted(p.name for p in Path(root).iterdir()) if Path(root).exists() else []


def test_extra_must_be_weights_only_loadable(tmp_path):
    msg, files = run_distributed(_save_numpy_extra, 1, str(tmp_path))[0]
    assert "weights_only" in msg and files == []


def test_rng_round_trip_survives_weights_only_load(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    torch.save(checkpoint.capture_rng(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.randn(2).tolist(), torch.randn(4))
    random.seed(4), np.random.seed(4), torch.manual_seed(4)
    checkpoint.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.randn(2).tolist()) == expected[:2] and torch.equal(torch.randn(4), expected[2])


def test_checkpoint_of_the_other_dp_engine_fails_naming_it(tmp_path):
    ds = tmp_path / "step_00000001"  # the layout DeepSpeedEngine.save leaves: DeepSpeed's tag folder, no .metadata
    (ds / checkpoint.DEEPSPEED).mkdir(parents=True)
    torch.save({"step": 1}, ds / "extra_rank0.pt")
    assert checkpoint.latest(tmp_path) == ds
    model, opt = _model_and_optimizer(False, seed=0)
    with pytest.raises(RuntimeError, match="written with parallel.dp_engine=deepspeed; resume it with that engine"):
        checkpoint.load(ds, model, opt)
    assert checkpoint.load_state(ds, lambda path: None, engine="deepspeed") == {"step": 1}

    dcp_only = checkpoint.save(tmp_path / "fsdp", 1, model, opt, {"step": 1})
    with pytest.raises(RuntimeError, match="no deepspeed/ folder: it was not written with parallel.dp_engine=deepspeed"):
        checkpoint.load_state(dcp_only, lambda path: None, engine="deepspeed")
