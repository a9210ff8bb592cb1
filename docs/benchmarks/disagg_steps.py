"""Which steps of a `disagg_dp_cp_gpu.sh` run lose to the balanced ideal, and what their rows hold (CPU only).

    python docs/benchmarks/disagg_steps.py IDEAL_DIR [RUN_DIR] [SEQ]

IDEAL_DIR holds a `disagg_dp_cp.json` with the `dp2_as0` / `dp2_as1` lanes (the ideal of each step is
their mean), RUN_DIR (default IDEAL_DIR) one with disagg lanes; SEQ tokens per GPU (65536). The rows
of each step are redrawn exactly as training draws them (llama_1b, lognormal documents of mean SEQ/4,
the script's data settings, train.seed), so each step's ratio prints beside its longest documents and
the score pairs the plan (eps 0.02, one plan, the default weights and row cost, SEQPAR_CUDNN_PREFIX as
set) hands to the other rank that run on the Triton kernel: a piece over a long prefix (any query
range of a document but its head), or a document's part past cuDNN's length cap
(`split.max_doc_len`). Then the time-weighted ratio over all steps, over the steps that move under
100M such pairs, and over the rest.
"""
import json
import sys
from pathlib import Path

from hydra import compose, initialize_config_module

from seqpar.attention.disagg.planner import TRITON_COST, KernelSpeed, plan_owned
from seqpar.config import register_configs
from seqpar.data import PackedLoader, build_dataset
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len
from seqpar.kernels.flash_attn.split_tasks import cudnn_prefix

ideal_dir = Path(sys.argv[1])
run_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else ideal_dir
SEQ = int(sys.argv[3]) if len(sys.argv) > 3 else 65536
FIRST = 3  # the script's mean starts at step 3

register_configs()
with initialize_config_module(config_module="seqpar.conf", version_base=None):
    cfg = compose("train", overrides=["model=llama_1b", "parallel=none", "data=synthetic", f"data.seq_len={SEQ}",
                                      "data.distribution=lognormal", f"data.mean_len={SEQ // 4}", "data.sigma=1.0",
                                      "train=long", "train.global_batch_size=2", "train.micro_batch_size=1"])
head_dim = cfg.model.head_dim or cfg.model.d_model // cfg.model.n_heads
cap = max_doc_len(cfg.model.n_heads, head_dim, 2)
speed = KernelSpeed(min_doc_len(cfg.model.n_heads), cap, cudnn_prefix(), TRITON_COST)  # the runtime's defaults
row_bytes = (cfg.model.n_heads * 2 * head_dim * 2, cfg.model.n_kv_heads * 2 * head_dim * 2)
MOVED = 100e6  # Triton-run pairs moved: a step above it "moves a prefix piece"
ideal = json.loads((ideal_dir / "disagg_dp_cp.json").read_text())
as0, as1 = (ideal[k]["step_times_s"] for k in ("dp2_as0", "dp2_as1"))
runs = {k: v["step_times_s"] for k, v in json.loads((run_dir / "disagg_dp_cp.json").read_text()).items()
        if "disagg" in k}
data = build_dataset(cfg.data, SEQ)
loaders = [PackedLoader(data, global_batch_size=2, micro_batch_size=1, dp_rank=r, dp_size=2, seed=cfg.train.seed)
           for r in range(2)]
moved = []
print(f"cuDNN's length cap at {cfg.model.n_heads} heads of {head_dim}: {cap} tokens")
for step in range(1, FIRST + len(as0)):
    rows = [loader.next_batch()[0].cu_seqlens.tolist() for loader in loaders]
    if step < FIRST:
        continue
    i = step - FIRST
    bounds = rows[0] + [SEQ + b for b in rows[1][1:]]
    plan = plan_owned(bounds, [[(0, SEQ)], [(SEQ, 2 * SEQ)]], eps=0.02, speed=speed, row_bytes=row_bytes)
    slow = sum(speed.by_kernel(t.q_end - t.q_start, t.q_end - t.kv_start, True)[1]
               for t in plan.tasks if t.server != t.owner)
    moved.append(slow)
    longest = [sorted((b - a for a, b in zip(r, r[1:])), reverse=True)[:3] for r in rows]
    ratios = "  ".join(f"{name} {t[i] / ((as0[i] + as1[i]) / 2):.3f}" for name, t in runs.items())
    past_cap = any(n > cap for r in longest for n in r)
    print(f"step {step:2d}  ideal {(as0[i] + as1[i]) / 2:.2f} s  {ratios}  rows' longest {longest}  "
          f"Triton pairs moved {slow / 1e6:.0f}M" + ("  (past the cap)" if past_cap else ""))
for name, t in runs.items():
    part = lambda keep: sum(t[i] for i in keep) / sum((as0[i] + as1[i]) / 2 for i in keep)
    steps = range(len(t))
    few, many = [i for i in steps if moved[i] < MOVED], [i for i in steps if moved[i] >= MOVED]
    print(f"{name}: all {part(steps):.4f}, steps moving under {MOVED / 1e6:.0f}M Triton pairs {part(few):.4f}, "
          f"the others {part(many):.4f}")
