"""The planner's settings scored offline against measured server calls (CPU only).

    python docs/benchmarks/disagg_plan_model.py [CALL_DIR]    (default docs/benchmarks/2026-11-28-gpu-28th/call3)

Issue 10. CALL_DIR holds `disagg_step_kernels_gpu.py`'s JSONs, without (`step_kernels.json`) and with
(`step_kernels_prefix.json`) the servers' pieces over a prefix on cuDNN: per step of the llama_1b dp=2
64k/GPU run, each rank's tasks and the measured fwd+bwd ms of its server call, and of each row's own
attention (the ideal). 1. A least-squares fit of a call's ms on its cuDNN square pairs, cuDNN prefix
pairs, Triton pairs, query rows (and tasks), which says what the planner's weights should be; 2. every
step re-planned (as the runtime plans: eps 0.02, the runtime's overhead and row bytes) with and without
prefix pieces, Triton weights 1.55 / 1.3 and row costs 0 / 1250, each rank's call priced by the fit
with rows, and the steps' attention excess over the ideal's rows (ms a step, 16 layers) printed: what
each setting should gain, before a GPU says.
"""
import json
import os
import statistics
import sys

import numpy as np
from hydra import compose, initialize_config_module

from seqpar.attention.disagg.options import DisaggOptions, planner_overhead
from seqpar.attention.disagg.planner import KernelSpeed
from seqpar.attention.disagg.runtime import _plan_routes
from seqpar.config import register_configs
from seqpar.data import PackedLoader, build_dataset
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len

CALL = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/2026-11-28-gpu-28th/call3"
SEQ, H, HKV, D, LAYERS = 65536, 32, 8, 64, 16
ROW_BYTES = (H * 2 * D * 2, HKV * 2 * D * 2)


def features(speed, tasks):
    """(cuDNN square pairs, cuDNN prefix pairs, Triton pairs, query rows, tasks) of a server's tasks."""
    square = prefix = triton = rows = 0
    for n, kv in tasks:
        fast, slow = speed.by_kernel(n, kv, True)
        prefix, square = (prefix + fast, square) if kv > n and fast else (prefix, square + fast)
        triton, rows = triton + slow, rows + n
    return [square, prefix, triton, rows, len(tasks)]


runs = {prefix: json.load(open(os.path.join(CALL, f"step_kernels{'_prefix' if prefix else ''}.json")))
        for prefix in (False, True)}
X, y = [], []
for prefix, run in runs.items():
    speed = KernelSpeed(min_doc_len(H), max_doc_len(H, D, 2), prefix, 1.55)
    for s in run["steps"]:
        for rank in range(2):
            X.append(features(speed, [(n, kv) for n, kv, _ in s["tasks"][rank]]))
            y.append(s["served"][rank])
X, y = np.array(X, float), np.array(y)
for cols, label in (([0, 1, 2], "pairs"), ([0, 1, 2, 3], "pairs + rows"), ([0, 1, 2, 3, 4], "pairs + rows + tasks")):
    coef = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
    err = X[:, cols] @ coef / y - 1
    extra = "".join(f", {name} {c / coef[0]:.0f} pairs" for name, c in zip(("a row", "a task"), coef[3:]))
    print(f"{label}: a cuDNN pair {coef[0] * 1e9:.1f} ms per billion, a prefix pair {coef[1] / coef[0]:.3f}, a Triton "
          f"pair {coef[2] / coef[0]:.3f}{extra}; rms error {np.sqrt((err ** 2).mean()):.1%}, worst {abs(err).max():.1%}")
    if len(cols) == 4:
        price = coef

register_configs()
with initialize_config_module(config_module="seqpar.conf", version_base=None):
    cfg = compose("train", overrides=["model=llama_1b", "parallel=none", "data=synthetic", f"data.seq_len={SEQ}",
                                      "data.distribution=lognormal", f"data.mean_len={SEQ // 4}", "data.sigma=1.0",
                                      "train=long", "train.global_batch_size=2", "train.micro_batch_size=1"])
data = build_dataset(cfg.data, SEQ)
loaders = [PackedLoader(data, global_batch_size=2, micro_batch_size=1, dp_rank=r, dp_size=2, seed=cfg.train.seed)
           for r in range(2)]
bounds = {}
for step in range(1, max(s["step"] for s in runs[False]["steps"]) + 1):
    rows = [loader.next_batch()[0].cu_seqlens.tolist() for loader in loaders]
    bounds[step] = tuple(rows[0] + [SEQ + b for b in rows[1][1:]])
opts = DisaggOptions(eps=0.02)
for prefix, run in runs.items():
    os.environ["SEQPAR_CUDNN_PREFIX"] = "1" if prefix else "0"  # split.runs_on_cudnn's chunk rule reads it
    ideal = {s["step"]: statistics.mean(s["own"]) for s in run["steps"]}
    for triton_cost in (1.55, 1.3):
        for row_cost in (0, 1250):
            speed = KernelSpeed(min_doc_len(H), max_doc_len(H, D, 2), prefix, triton_cost, row_cost)
            excess = 0.0
            for step in ideal:
                ms = []
                for rank in range(2):
                    _, info = _plan_routes(bounds[step], 2 * SEQ, 2, rank, "contiguous", opts.eps, opts.min_chunk, True,
                                           planner_overhead(opts), ROW_BYTES, "single", speed)
                    tasks = [(t.q_end - t.q_start, t.q_end - t.kv_start) for t in info["plan"] if t.server == rank]
                    ms.append(float(np.array(features(speed, tasks)[:4]) @ price))
                excess += max(ms) - ideal[step]
            print(f"prefix pieces on cuDNN {prefix!s:5}  triton_cost {triton_cost}  row_cost {row_cost:4}: attention "
                  f"{LAYERS * excess / len(ideal):5.1f} ms a step over the ideal's (measured at 1.55 / 0: "
                  f"{run['summary']['excess_ms_per_step']:.1f})")
