"""launcher=ray against a real Ray cluster: `ray start --head` on loopback with 2 CPUs, once for the module."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[test]' brings ray[default]")
from ray.util.state import list_actors

from seqpar import checkpoint
from seqpar.config import ConfigError, validate
from tests.distributed import wait_until
from tests.test_config import make_cfg

BIN = Path(sys.executable).parent
# checkpoint_every=2 gives a worker loss a checkpoint to resume from; fp32 on CPU so losses compare exactly
OVERRIDES = ["launcher=ray", "launcher.nproc_per_node=2", "train.device=cpu", "train.dtype=fp32", "data.seq_len=64",
             "train.global_batch_size=2", "train.micro_batch_size=1", "train.warmup_steps=2", "train.lr=1e-3",
             "train.steps=8", "train.checkpoint_every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths must stay under 107 characters: a short temp dir, not pytest's deep one
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    gcs, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    # ports outside Ray's worker range (10002-19999); --block keeps `ray start` as this fixture's child,
    # and stopping it stops exactly the processes it started (`ray stop` would stop every Ray on the machine)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={gcs}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
         f"--temp-dir={temp}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address, url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}"
    try:
        up = lambda: subprocess.run([str(BIN / "ray"), "job", "list", "--address", url], env=env,
                                    capture_output=True).returncode == 0
        if not wait_until(up, 120, 1):
            head.terminate()
            pytest.fail(f"`ray start --head` did not come up within 120 s: {head.communicate(timeout=30)[1][-3000:]}")
        yield {"address": address, "dashboard": url, "env": env}
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def job_run(cluster, tmp_path_factory):
    """`ray job submit -- seqpar-train launcher=ray ...`, uninterrupted: the driver runs as a Ray job."""
    run_dir = tmp_path_factory.mktemp("job") / "run"
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--",
                        "seqpar-train", *OVERRIDES, f"run_dir={run_dir}"],
                       env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout, _metrics(run_dir)


def test_ray_job_submit_trains_and_streams_worker_output(job_run):
    output, metrics = job_run
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert "step 8/8" in output  # rank 0's console line, forwarded from its actor through the job's log


def test_lost_worker_restarts_group_from_checkpoint(cluster, job_run, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "driver.log"
    with open(log, "w") as out:  # a file, not a pipe: nobody reads a pipe while the test waits
        driver = subprocess.Popen([sys.executable, "-m", "seqpar.train", *OVERRIDES,
                                   f"launcher.address={cluster['address']}", f"run_dir={run_dir}"],
                                  env=cluster["env"], stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: checkpoint.latest(run_dir / "checkpoints") is not None, 240, 0.2), "no checkpoint"
        alive = list_actors(address=cluster["dashboard"], filters=[("class_name", "=", "RankWorker"),
                                                                   ("state", "=", "ALIVE")])
        assert len(alive) == 2, alive
        os.kill(alive[1].pid, signal.SIGKILL)  # a worker's process dies as on a lost node
        driver.wait(timeout=300)
    finally:
        driver.kill()
    output = log.read_text()
    assert driver.returncode == 0, output[-3000:]
    assert "restart 1/3 of all 2 ranks from" in output, output[-3000:]
    resumed = _metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 9))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in job_run[1]]


def test_no_placement_fails_before_training(cluster, tmp_path):
    r = subprocess.run([sys.executable, "-m", "seqpar.train", *OVERRIDES, "launcher.nproc_per_node=4",
                        "parallel.cp=2", f"launcher.address={cluster['address']}", f"run_dir={tmp_path / 'run'}"],
                       env=cluster["env"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and "no placement for 4 ranks" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unreachable_ray_address_fails_fast(tmp_path):
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "seqpar.train", *OVERRIDES, f"launcher.address=127.0.0.1:{_free_port()}",
                        f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2 and "no Ray cluster answers there" in r.stderr, r.stderr[-2000:]
    assert time.monotonic() - start < 60  # Ray's own retries would take minutes
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("override, message", [
    ("launcher.placement_strategy=DIAGONAL", "launcher.placement_strategy='DIAGONAL': choose PACK, SPREAD"),
    ("launcher.max_restarts=-1", "launcher.max_restarts=-1"),
    ("launcher=moon", None),  # Hydra itself refuses a launcher group that does not exist
])
def test_bad_ray_launcher_keys_are_named(override, message):
    if message is None:
        with pytest.raises(Exception, match="launcher"):
            make_cfg(*OVERRIDES, override)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(make_cfg(*OVERRIDES, override), world=2)
