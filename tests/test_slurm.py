"""launcher=slurm against a real Slurm: munged, slurmctld and slurmd on this machine (2 CPUs, one node),
started once for the module from a generated slurm.conf in a temporary folder."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from seqpar.config import ConfigError
from tests.distributed import wait_until
from seqpar.launch.slurm import SlurmEnvError, master_port, rendezvous_env, sbatch_options
from tests.test_config import make_cfg

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # seqpar-train must be on the job's PATH
# 12 steps: enough of a window to signal the job mid-run; fp32 on CPU so losses compare exactly
OVERRIDES = ["train.device=cpu", "train.dtype=fp32", "data.seq_len=64", "train.global_batch_size=2",
             "train.micro_batch_size=1", "train.warmup_steps=2", "train.lr=1e-3", "train.steps=12",
             "logging.console=false"]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, host: str) -> str:
    return f"""ClusterName=seqpartest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/munge-run/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"Slurm cannot start: {', '.join(missing)} not found; install Debian's slurm-wlm and munge "
                    "(`apt-get install slurm-wlm munge`, as .ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("Slurm cannot start: slurmd must run as root to launch job steps")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("munge-key", "munge-run", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge-key").chmod(0o700)
    (root / "munge-run").chmod(0o755)  # munge clients (slurm's daemons and commands) reach the socket here
    key = root / "munge-key" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs = []
    try:
        # foreground daemons (-F/-D) are this fixture's children: it stops exactly these at the end
        procs.append(subprocess.Popen(["munged", "-F", "--force", f"--socket={root}/munge-run/munge.socket",
                                       f"--key-file={key}", f"--pid-file={root}/munge-run/munged.pid",
                                       f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge-key/seed"]))
        wait_until(lambda: (root / "munge-run" / "munge.socket").exists(), 20)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env))
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf)], env=env))
        idle = lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                      text=True).stdout.strip() == "idle"
        if not wait_until(idle, 60):
            logs = "\n".join(p.read_text()[-1500:] for p in sorted((root / "log").glob("*.log")))
            pytest.skip(f"Slurm cannot start: the node did not become idle within 60 s. Logs:\n{logs}")
        yield env
    finally:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=env)
            wait_until(lambda: not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout, 30)
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def _job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait_job_done(env, job_id: str, timeout: float = 240) -> dict:
    done = lambda: _job(env, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    assert wait_until(done, timeout, 1), f"job {job_id} still {_job(env, job_id).get('JobState')} after {timeout} s"
    return _job(env, job_id)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sbatch_run(slurm, tmp_path_factory):
    """The documented CPU command line: sbatch the single-node script with Hydra overrides, uninterrupted."""
    work = tmp_path_factory.mktemp("sbatch")
    r = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0",
                        str(REPO / "slurm" / "train_single_node.sbatch"), *OVERRIDES, f"run_dir={work / 'run'}"],
                       cwd=work, env=slurm, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    job = _wait_job_done(slurm, job_id)
    log = (work / f"seqpar-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    return _metrics(work / "run")


def test_sbatch_script_trains_two_tasks(sbatch_run):
    assert [m["step"] for m in sbatch_run] == list(range(1, 13))
    assert sbatch_run[-1]["tokens"] == 12 * 2 * 64


def test_launcher_slurm_submits_and_usr1_requeues_and_resumes(slurm, sbatch_run, tmp_path):
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "seqpar.train", "launcher=slurm", "launcher.nproc_per_node=2",
                        *OVERRIDES, f"run_dir={run_dir}"], cwd=tmp_path, env=slurm, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = r.stdout.split("submitted Slurm job ")[1].split(";")[0]
    assert wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text(), 180, 0.2)
    # what Slurm sends --signal=USR1@300 before the time limit, sent now to every task of the job step
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm, check=True)
    requeued = lambda: _job(slurm, job_id).get("JobState") == "PENDING" and _job(slurm, job_id).get("Restarts") == "1"
    assert wait_until(requeued, 120), f"job {job_id} was not requeued: {_job(slurm, job_id)}"
    interrupted_at = max(m["step"] for m in _metrics(run_dir))
    assert interrupted_at < 12, "the run finished before the signal arrived; nothing was tested"
    # Slurm holds a requeued job for 2 minutes (BeginTime); release it after the old credential's second is over
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, check=True)
    job = _wait_job_done(slurm, job_id)
    log = (tmp_path / f"seqpar-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED", log[-3000:]
    assert "requeued and will resume" in log
    resumed = _metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in sbatch_run]
    assert (run_dir / "checkpoints" / "step_00000012").is_dir()


def test_nodelist_range_expands_to_its_first_host(slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])  # scontrol reads the cluster's config to expand the list
    env = {"SLURM_JOB_ID": "77", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08],cpu01"}
    assert rendezvous_env(env) == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(master_port(77)), "RANK": "1",
                                   "WORLD_SIZE": "4", "LOCAL_RANK": "1"}


TASK = {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "node1"}


@pytest.mark.parametrize("change, message", [
    ({"SLURM_NTASKS": None}, "SLURM_NTASKS is not set"),
    ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
    ({"SLURM_STEP_NUM_TASKS": "1"}, "SLURM_STEP_NUM_TASKS=1"),
    ({"SLURM_LOCALID": "x"}, "SLURM_LOCALID='x'"),
])
def test_bad_slurm_env_is_named(change, message):
    env = {k: v for k, v in {**TASK, **change}.items() if v is not None}
    with pytest.raises(SlurmEnvError, match=message):
        rendezvous_env(env)


def test_slurm_task_count_not_fitting_the_parallel_dims_exits_before_training(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({**TASK, "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3"})
    message = "SLURM_NTASKS=3 does not fit parallel.dp*pp*cp*tp=-1*1*2*1: submit a multiple of 2 tasks"
    r = subprocess.run([sys.executable, "-m", "seqpar.train", "launcher=slurm", "parallel.cp=2", *OVERRIDES,
                        f"run_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sbatch_options_follow_the_launcher_config():
    cfg = make_cfg("launcher=slurm", "train.device=auto", "launcher.nnodes=4", "launcher.partition=gpu",
                   "launcher.time_limit=02:00:00")
    assert sbatch_options(cfg) == ["--parsable", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
                                   "--partition=gpu", "--time=02:00:00"]
    with pytest.raises(ConfigError, match="launcher=slurm needs launcher.nproc_per_node=N"):
        sbatch_options(make_cfg("launcher=slurm", "launcher.nproc_per_node=auto"))
