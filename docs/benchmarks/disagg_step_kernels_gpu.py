"""Attention alone, per rank, on the steps of a `disagg_dp_cp_gpu.sh` run (one GPU, ~2 minutes).

    python docs/benchmarks/disagg_step_kernels_gpu.py OUT.json [SEQ] [FIRST] [LAST]

Issue 10: llama_1b dp=2 at 64k tokens per GPU runs 1.04-1.05x the balanced ideal, the steps that move
much work 1.06-1.10x. Is that the attention itself (the planner's model of the kernels wrong on
those steps), or what surrounds it (transfers, copies, waits)? Each step's rows are redrawn as
training draws them (docs/benchmarks/disagg_steps.py), planned as the runtime plans them (eps 0.02,
the default weights, `runtime._plan_routes`), and on one GPU, bf16, llama_1b's heads, timed fwd+bwd
(triton's do_bench, median; 2026-11-28-gpu-28th/call3 ran an earlier form of this script: the median of
3 CUDA-event timings after a warm-up):
- `own`: each row's documents as the model's self-attention (`flash_attn` with autograd), what the
  ideal's ranks run;
- `served`: each rank's server call of the plan (its tasks, `flash_attn` with separate query and key
  boundaries and the lse, then `flash_attn_backward`), what disagg's ranks run;
- `served_own`: each row's documents through that server path unplanned (what a plan that moves
  nothing runs).
Times in ms per layer; the model's loads (cuDNN pairs) beside them. SEQPAR_CUDNN_PREFIX applies;
TRITON_COST=W plans with parallel.disagg.triton_cost=W.
"""
import json
import os
import statistics
import sys

import torch
from hydra import compose, initialize_config_module

from seqpar.attention.disagg import KernelSpeed
from seqpar.attention.disagg.options import DisaggOptions, planner_overhead
from seqpar.attention.disagg.runtime import _plan_routes, _to_device
from seqpar.config import register_configs
from seqpar.data import PackedLoader, build_dataset
from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len
from seqpar.kernels.flash_attn.split_tasks import cudnn_prefix
from triton.testing import do_bench

out_path = sys.argv[1]
SEQ = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
FIRST, LAST = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (3, 18)

register_configs()
with initialize_config_module(config_module="seqpar.conf", version_base=None):
    cfg = compose("train", overrides=["model=llama_1b", "parallel=none", "data=synthetic", f"data.seq_len={SEQ}",
                                      "data.distribution=lognormal", f"data.mean_len={SEQ // 4}", "data.sigma=1.0",
                                      "train=long", "train.global_batch_size=2", "train.micro_batch_size=1"])
m = cfg.model
H, HKV, D = m.n_heads, m.n_kv_heads, m.head_dim or m.d_model // m.n_heads
opts = DisaggOptions(eps=0.02, **({"triton_cost": float(os.environ["TRITON_COST"])} if "TRITON_COST" in os.environ else {}))
speed = KernelSpeed(min_doc_len(H), max_doc_len(H, D, 2), cudnn_prefix(), opts.triton_cost)
row_bytes = (H * 2 * D * 2, HKV * 2 * D * 2)
dev = torch.device("cuda")
gen = torch.Generator(device=dev).manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=gen)


def timed(fn):
    """Median ms (triton's do_bench, as `bench kernels` times)."""
    return do_bench(fn, warmup=100, rep=300, return_mode="median")


def own(bounds):
    q, k, v = (rand(1, bounds[-1], h, D).requires_grad_() for h in (H, HKV, HKV))
    do, cu = rand(1, bounds[-1], H, D), _to_device(list(bounds), dev)

    def run():
        flash_attn(q, k, v, causal=True, cu_seqlens=cu).backward(do)
    return timed(run)


def served(cu_q, cu_k):
    q, do, k, v = rand(1, cu_q[-1], H, D), rand(1, cu_q[-1], H, D), rand(1, cu_k[-1], HKV, D), rand(1, cu_k[-1], HKV, D)
    tq, tk = _to_device(list(cu_q), dev), _to_device(list(cu_k), dev)

    def run():
        o, lse = flash_attn(q, k, v, causal=True, cu_seqlens_q=tq, cu_seqlens_k=tk, return_lse=True)
        flash_attn_backward(do, q, k, v, o, lse, causal=True, cu_seqlens_q=tq, cu_seqlens_k=tk)
    return timed(run)


data = build_dataset(cfg.data, SEQ)
loaders = [PackedLoader(data, global_batch_size=2, micro_batch_size=1, dp_rank=r, dp_size=2, seed=cfg.train.seed)
           for r in range(2)]
steps = []
for step in range(1, LAST + 1):
    rows = [loader.next_batch()[0].cu_seqlens.tolist() for loader in loaders]
    if step < FIRST:
        continue
    bounds = tuple(rows[0] + [SEQ + b for b in rows[1][1:]])
    line = {"step": step, "own": [], "served": [], "served_own": [], "loads": [], "tasks": []}
    for rank in range(2):
        routes, info = _plan_routes(bounds, 2 * SEQ, 2, rank, "contiguous", opts.eps, opts.min_chunk, True,
                                    planner_overhead(opts), row_bytes, "single", speed)
        (r,) = routes
        mine = [t for t in info["plan"] if t.server == rank]
        line["loads"].append(sum(speed.cost(t.q_end - t.q_start, t.q_end - t.kv_start, True) for t in mine))
        line["tasks"].append([(t.q_end - t.q_start, t.q_end - t.kv_start, t.owner) for t in mine])
        line["served"].append(served(r.cu_q, r.cu_k))
        line["own"].append(own(rows[rank]))
        line["served_own"].append(served(rows[rank], rows[rank]))
    ideal, disagg = statistics.mean(line["own"]), max(line["served"])
    line["x_ideal_attention"] = disagg / ideal
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in line.items() if k != "tasks"}),
          flush=True)
    steps.append(line)
    torch.cuda.empty_cache()
total = lambda key, f: sum(f(s[key]) for s in steps)  # noqa: E731
summary = {"layers": m.n_layers, "prefix": cudnn_prefix(), "triton_cost": speed.triton_cost, "row_cost": speed.row_cost,
           "ideal_ms_per_layer": total("own", statistics.mean), "disagg_ms_per_layer": total("served", max),
           "served_own_mean_ms_per_layer": total("served_own", statistics.mean)}
summary["excess_ms_per_step"] = m.n_layers * (summary["disagg_ms_per_layer"] - summary["ideal_ms_per_layer"]) / len(steps)
print(json.dumps(summary))
with open(out_path, "w") as f:
    json.dump({"summary": summary, "steps": steps, "device": torch.cuda.get_device_name()}, f, indent=1)
