"""Per-step metrics to their sinks: `run_dir/metrics.jsonl`, the console, and Weights & Biases.

Only rank 0 writes: the trainer reduces loss and counts before logging, so every rank holds the
same numbers and one copy is enough.
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

# trainer key -> (W&B key in torchtitan's namespaces, scale); keys not listed and already
# namespaced (e.g. `sp/imbalance`) pass through unchanged
WANDB_KEYS: dict[str, tuple[str, float]] = {
    "loss": ("loss_metrics/global_avg_loss", 1.0),
    "grad_norm": ("loss_metrics/grad_norm", 1.0),
    "lr": ("optim/lr", 1.0),
    "tokens": ("throughput/tokens_seen", 1.0),
    "tokens_per_s": ("throughput/tps", 1.0),
    "step_time_s": ("time_metrics/end_to_end_s", 1.0),
    "startup_s": ("time_metrics/startup_s", 1.0),
    "mfu": ("mfu/mfu_pct", 100.0),
    "max_mem_gb": ("memory/max_allocated_gib", 1.0),
}

# dense bf16 peaks from the vendors' data sheets (no sparsity); name fragments checked in order
_PEAK_BF16 = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak FLOP/s of a known CUDA GPU; None where MFU would mean nothing (CPU, unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peak in _PEAK_BF16:
        if fragment in name:
            return peak
    return None


def max_memory_gb(device: torch.device | str) -> float | None:
    """Peak memory allocated by tensors on a CUDA device so far, in GiB; None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def alloc_retries(device: torch.device | str) -> int | None:
    """How often the CUDA caching allocator found no free block, released its cache and retried
    (each release synchronises the device: a stall that shows as one rank late), since the start;
    None off CUDA. A count that grows step after step means fragmentation (torchtitan logs it too)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    elif hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    # NaN/inf are not JSON numbers; null keeps the line parseable by every reader
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _trim_after(path: Path, start_step: int) -> None:
    """Drop lines of steps after start_step (the resumed run redoes them) and a torn last line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short when the previous run was killed
        if line.endswith("\n") and record.get("step", 0) <= start_step:
            keep.append(line)
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


class MetricsLogger:
    """Writes one JSON line per `log` call, drives a progress bar (or plain summaries), and feeds W&B."""

    def __init__(self, run_dir: Path, *, total_steps: int, rank: int, console: bool = True, wandb: bool = False,
                 wandb_project: str = "seqpar", wandb_run_name: str | None = None, config: dict | None = None,
                 start_step: int = 0, print_every: int = 10):
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.print_every = max(1, print_every)
        self._file = None
        self._progress = None
        self._task = None
        self._wandb_run = None
        self._console = console
        self._last_printed: int | None = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        _trim_after(self.path, start_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if console and sys.stdout.isatty():
            self._start_progress(start_step)
        if wandb:
            import wandb as wandb_lib  # optional dependency: only runs that ask for it need it

            self._wandb_run = wandb_lib.init(project=wandb_project, name=wandb_run_name, dir=str(run_dir),
                                             config=config, mode=os.environ.get("WANDB_MODE", "offline"))

    def _start_progress(self, start_step: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("step"), MofNCompleteColumn(), BarColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("train", total=self.total_steps, completed=start_step, loss="-", tps="-")
        self._progress.start()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("metrics must not contain 'step': pass it as log(step, metrics)")
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps every step it finished
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=_fmt(record.get("loss"), ".4f"),
                                  tps=_fmt(record.get("tokens_per_s"), ",.0f"))
        elif self._console and self._due(step):
            print(summary_line(record, self.total_steps), flush=True)
            self._last_printed = step
        if self._wandb_run is not None:
            self._wandb_run.log(wandb_keys(record), step=int(step))

    def _due(self, step: int) -> bool:
        return (self._last_printed is None or step - self._last_printed >= self.print_every
                or step >= self.total_steps)

    def close(self, *, failed: bool = False) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=1 if failed else 0)
            self._wandb_run = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def wandb_keys(record: dict) -> dict:
    out = {}
    for key, value in record.items():
        if key == "step" or value is None:
            continue
        name, scale = WANDB_KEYS.get(key, (key if "/" in key else f"misc/{key}", 1.0))
        out[name] = value * scale if scale != 1.0 else value
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_line(record: dict, total_steps: int) -> str:
    """torchtitan's one-line form: step, loss, grad norm, memory, throughput, MFU, step time."""
    width = len(str(total_steps))
    parts = [f"step {record['step']:>{width}}/{total_steps}", f"loss {_fmt(record.get('loss'), '.4f')}"]
    optional = [("grad_norm", "grad_norm {}", ".3f"), ("max_mem_gb", "mem {}GiB", ".2f"),
                ("tokens_per_s", "tps {}", ",.0f"), ("mfu", "mfu {}%", ".1f"), ("step_time_s", "time {}s", ".3f"),
                ("lr", "lr {}", ".2e")]
    for key, template, spec in optional:
        if record.get(key) is not None:
            value = record[key] * 100 if key == "mfu" else record[key]
            parts.append(template.format(format(value, spec)))
    return "  ".join(parts)


@contextmanager
def profiled(step: int, logging_cfg, run_dir: Path, rank: int, device: torch.device):
    """torch.profiler over the block when `step` is `logging.profile_step`: the ops of every rank
    (its GPU kernels first on CUDA) as a table in `run_dir/profile/step<N>_rank<R>.txt`, and the
    Chrome trace beside it with `logging.profile_trace`; on CUDA without the CPU ops with
    `logging.profile_cpu_ops=false` (docs/benchmarks/trace_gaps.py reads such a trace: where the GPU
    stood still, and whether for the host or a collective). Other steps run as they are."""
    if step != logging_cfg.profile_step:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = ([ProfilerActivity.CPU] if logging_cfg.profile_cpu_ops or not cuda else []) + \
        ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        yield
        if cuda:
            torch.cuda.synchronize()
    out = Path(run_dir) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    name = f"step{step}_rank{rank}"
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)
    (out / f"{name}.txt").write_text(table + "\n")
    if logging_cfg.profile_trace:
        prof.export_chrome_trace(str(out / f"{name}.json"))
