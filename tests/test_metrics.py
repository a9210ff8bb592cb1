"""metrics.jsonl format and resume, rank filtering, plain-text summaries, wandb offline files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from seqpar.metrics import MetricsLogger, alloc_retries, max_memory_gb, peak_flops, summary_line, wandb_keys


def _metrics(step: int) -> dict:
    return {"loss": torch.tensor(3.0 - 0.1 * step, dtype=torch.float64), "lr": 1e-3, "tokens": 256 * step,
            "tokens_per_s": np.float32(1234.5), "step_time_s": 0.2, "grad_norm": 1.5}


def _lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_jsonl_one_object_per_step_with_step_first(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, rank=0, console=False) as logger:
        for step in (1, 2, 3):
            logger.log(step, _metrics(step))
            assert len(_lines(tmp_path)) == step  # flushed at once, before close
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(line.startswith('{"step": ') for line in lines)
    for r in records:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "step_time_s", "grad_norm"} <= r.keys()
        assert all(isinstance(v, (int, float)) for v in r.values())
    assert records[0]["loss"] == pytest.approx(2.9) and records[2]["tokens"] == 768


def test_resume_appends_and_drops_steps_after_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, total_steps=10, rank=0, console=False) as logger:
        for step in range(1, 8):
            logger.log(step, _metrics(step))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')  # the line a kill cut short
    # the checkpoint was at step 5: steps 6 and 7 are redone, so their old lines go
    with MetricsLogger(tmp_path, total_steps=10, rank=0, console=False, start_step=5) as logger:
        for step in range(6, 11):
            logger.log(step, _metrics(step))
    assert [r["step"] for r in _lines(tmp_path)] == list(range(1, 11))


def test_non_finite_values_stay_valid_json(tmp_path):
    with MetricsLogger(tmp_path, total_steps=1, rank=0, console=False) as logger:
        logger.log(1, {"loss": float("nan"), "grad_norm": float("inf")})
    assert _lines(tmp_path) == [{"step": 1, "loss": None, "grad_norm": None}]


def test_other_ranks_write_nothing(tmp_path, capsys):
    with MetricsLogger(tmp_path / "r1", total_steps=2, rank=1, console=True, wandb=True) as logger:
        logger.log(1, _metrics(1))
    assert not (tmp_path / "r1").exists() and capsys.readouterr().out == ""


def test_non_tty_prints_compact_summaries_every_n_steps(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=25, rank=0, print_every=10) as logger:
        for step in range(1, 26):
            logger.log(step, {**_metrics(step), "mfu": 0.412, "max_mem_gb": 3.25})
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["1/25", "11/25", "21/25", "25/25"]
    assert "loss 1.9000" in out[1] and "tps 1,234" in out[1] and "mfu 41.2%" in out[1] and "mem 3.25GiB" in out[1]
    assert "\x1b" not in "".join(out)  # no terminal control codes in log files


def test_wandb_keys_are_namespaced():
    keys = wandb_keys({"step": 3, "loss": 2.0, "tokens_per_s": 10.0, "mfu": 0.5, "max_mem_gb": 1.0,
                       "sp/imbalance": 1.1, "custom": 4})
    assert keys == {"loss_metrics/global_avg_loss": 2.0, "throughput/tps": 10.0, "mfu/mfu_pct": 50.0,
                    "memory/max_allocated_gib": 1.0, "sp/imbalance": 1.1, "misc/custom": 4}
    assert summary_line({"step": 3, "loss": 2.0}, 100) == "step   3/100  loss 2.0000"


def test_wandb_offline_run_writes_under_run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(tmp_path, total_steps=2, rank=0, console=False, wandb=True, wandb_run_name="t",
                       config={"train": {"lr": 1e-3}}) as logger:
        for step in (1, 2):
            logger.log(step, _metrics(step))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((tmp_path / "wandb").iterdir())
    assert len(_lines(tmp_path)) == 2


def test_peak_flops_and_memory_are_none_off_cuda():
    assert peak_flops(torch.device("cpu")) is None and max_memory_gb("cpu") is None
    assert alloc_retries("cpu") is None


@pytest.mark.gpu
def test_peak_flops_known_gpu():
    name = torch.cuda.get_device_name()
    expected = 989e12 if ("H100" in name and "PCIe" not in name and "NVL" not in name) or "H200" in name else None
    if expected is None:
        pytest.skip(f"no stated peak for {name}")
    assert peak_flops(torch.device("cuda")) == expected
    torch.ones(1 << 20, device="cuda")
    assert max_memory_gb("cuda") > 0 and alloc_retries("cuda") >= 0


TRACE_GAPS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "trace_gaps.py"


def _trace_gaps(trace: Path, tmp_path: Path) -> dict:
    out = tmp_path / "gaps.json"
    subprocess.run([sys.executable, str(TRACE_GAPS), str(trace), str(out), "100"], check=True, capture_output=True)
    return json.loads(out.read_text())


def test_trace_gaps_tells_host_stalls_from_collective_waits(tmp_path):
    def event(cat, name, ts, dur, corr=None):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, args={} if corr is None else dict(correlation=corr))

    # A (0-100), a collective (100-400) that B (launched at 50) waited for, then 400 us without
    # anything launched: C's launch came at 800 from inside the host op `plan`
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        event("kernel", "A", 0, 100, 1), event("kernel", "ncclDevKernel_SendRecv", 100, 300, 2),
        event("kernel", "B", 400, 100, 3), event("kernel", "C", 900, 100, 4),
        event("cuda_runtime", "cudaLaunchKernel", 50, 5, 3), event("cuda_runtime", "cudaLaunchKernel", 800, 5, 4),
        event("cpu_op", "plan", 700, 150)]}))
    got = _trace_gaps(trace, tmp_path)
    assert got["gap_ms"] == {"comm": 0.3, "host": 0.4} and got["compute_ms"] == 0.3 and got["nccl_ms"] == 0.3
    host, comm = got["longest"]
    assert (host["kind"], host["before"], host["after"], host["host"]) == ("host", "B", "C", ["plan"])
    assert (comm["kind"], comm["us"], comm["host"]) == ("comm", 300, None)


@pytest.mark.gpu
def test_profile_without_cpu_ops_keeps_kernels_and_launches(tmp_path):
    from omegaconf import OmegaConf
    from seqpar.config import LoggingConfig
    from seqpar.metrics import profiled

    cfg = OmegaConf.structured(LoggingConfig(profile_step=1, profile_trace=True, profile_cpu_ops=False))
    x = torch.randn(1024, 1024, device="cuda")
    with profiled(1, cfg, tmp_path, 0, torch.device("cuda")):
        for _ in range(3):
            x = x @ x
    trace = tmp_path / "profile" / "step1_rank0.json"
    cats = {e.get("cat") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"kernel", "cuda_runtime"} <= cats and "cpu_op" not in cats, cats
    assert _trace_gaps(trace, tmp_path)["compute_ms"] > 0
