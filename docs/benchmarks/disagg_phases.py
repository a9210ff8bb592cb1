"""Forward and backward attention balance of disagg's plans, step by step, in the runs of
`disagg_dp_cp_gpu.sh` (CPU only: the same seeded rows and plans as cudnn_shapes.py). The planner
balances one cost per server, a Triton score pair weighing `triton_cost` (1.7: the backward's ratio)
cuDNN pairs; but every layer waits for its slowest server in each direction, and a Triton pair
costs ~1.06 cuDNN pairs forward, ~1.74 backward (2026-11-26-2gpu-9th/call7). A server given Triton
work is then balanced in the backward, not in the forward. Prints per step the modelled forward and
backward imbalance (max / mean over servers), each server's cuDNN and Triton pairs (G) and the
plan's own imbalance before and after.

    python docs/benchmarks/disagg_phases.py [SEQ] [STEPS] [prefix]      (default 65536 18)

`prefix`: the servers' causal pieces over a prefix on cuDNN (SEQPAR_CUDNN_PREFIX=1)."""
import json
import sys

from cudnn_shapes import _rows

from seqpar.attention.disagg import KernelSpeed, plan
from seqpar.attention.disagg.options import DisaggOptions, planner_overhead
from seqpar.attention.disagg.planner import pairs
from seqpar.kernels.flash_attn.split import cudnn_head, max_doc_len, min_doc_len, runs_on_cudnn

FORWARD, BACKWARD = 1.06, 1.74  # a Triton pair in cuDNN pairs


def split_pairs(task, speed: KernelSpeed) -> tuple[int, int]:
    """(cuDNN pairs, Triton pairs) of a causal task, as a server's split runs it (KernelSpeed.cost's rule)."""
    n, m = task.q_end - task.q_start, task.q_end - task.kv_start
    total = pairs(m - n, m, 0)
    if runs_on_cudnn(n, m, speed.min_len, speed.max_len, speed.prefix):
        return total, 0
    head = cudnn_head(n, m, speed.min_len, speed.max_len, speed.prefix)
    fast = pairs(m - n, m - n + head, 0) if head else 0
    return fast, total - fast


def main(seq=65536, steps=18, prefix=False):
    rows, heads, head_dim = _rows(seq, steps)
    opts = DisaggOptions()
    speed = KernelSpeed(min_doc_len(heads), max_doc_len(heads, head_dim, 2), prefix, opts.triton_cost)
    row_bytes = (heads * 2 * head_dim * 2, 8 * 2 * head_dim * 2)
    imbalance = lambda x: max(x) / (sum(x) / len(x))  # noqa: E731
    for step, (r0, r1) in enumerate(rows, 1):
        p = plan(r0 + [seq + b for b in r1[1:]], 2, eps=opts.eps, min_chunk=opts.min_chunk,
                 overhead=planner_overhead(opts), row_bytes=row_bytes, speed=speed)
        cudnn, triton = [0, 0], [0, 0]
        for t in p.tasks:
            c, tr = split_pairs(t, speed)
            cudnn[t.server] += c
            triton[t.server] += tr
        fwd = [c + FORWARD * t for c, t in zip(cudnn, triton)]
        bwd = [c + BACKWARD * t for c, t in zip(cudnn, triton)]
        print(json.dumps({"step": step, "forward": round(imbalance(fwd), 3), "backward": round(imbalance(bwd), 3),
                          "cudnn_G": [round(x / 1e9, 3) for x in cudnn], "triton_G": [round(x / 1e9, 3) for x in triton],
                          "plan_before": round(p.initial_imbalance, 3), "plan_after": round(p.imbalance, 3)}))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), prefix="prefix" in sys.argv[3:])
