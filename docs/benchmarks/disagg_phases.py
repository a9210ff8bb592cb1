"""Forward and backward attention balance of disagg's plans, step by step, in the runs of
`disagg_dp_cp_gpu.sh` (CPU only: the same seeded rows and plans as cudnn_shapes.py). The planner
balances one cost per server, a Triton score pair weighing `triton_cost` (1.7: the backward's ratio)
cuDNN pairs; but every layer waits for its slowest server in each direction, and a Triton pair
costs ~1.06 cuDNN pairs forward, ~1.74 backward (2026-11-26-2gpu-9th/call7). A server given Triton
work is then balanced in the backward, not in the forward. Prints per step the modelled forward and
backward imbalance (max / mean over servers), each server's cuDNN and Triton pairs (G) and the
plan's own imbalance before and after.

    python docs/benchmarks/disagg_phases.py [SEQ] [STEPS] [EPS] [prefix]      (default 65536 18 0.1)

EPS: parallel.disagg.eps; `prefix`: the servers' causal pieces over a prefix on cuDNN
(SEQPAR_CUDNN_PREFIX=1). The last line: the means over steps 3 on, the imbalance of both directions
weighted by their times (the backward 2.6x the forward) and the bytes moved.

Eleventh session (call 4's rows, prefix pieces on Triton), means of steps 3-18: eps 0.1 forward
1.049, backward 1.037, weighted 1.040, 102 MB into the servers per layer's forward; eps 0.05: 1.039
/ 1.019 / 1.025, 110 MB; eps 0.02: 1.048 / 1.005 / 1.017, 108 MB. Choosing among the planner's
candidate moves by the waits of each direction (tried, not kept) gave 1.015 at eps 0.02 for 152 MB."""
import json
import sys

from cudnn_shapes import _rows

from seqpar.attention.disagg import KernelSpeed, plan
from seqpar.attention.disagg.options import DisaggOptions, planner_overhead
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len

FORWARD, BACKWARD = 1.06, 1.74  # a Triton pair in cuDNN pairs (planner.TRITON_COST's run)
BACKWARD_TIME = 2.6  # cuDNN's backward time per pair over its forward's


def main(seq=65536, steps=18, eps=0.1, triton_cost=1.7, prefix=False):
    rows, heads, head_dim = _rows(seq, steps)
    opts = DisaggOptions(eps=eps, triton_cost=triton_cost)
    speed = KernelSpeed(min_doc_len(heads), max_doc_len(heads, head_dim, 2), prefix, opts.triton_cost)
    row_bytes = (heads * 2 * head_dim * 2, 8 * 2 * head_dim * 2)
    imbalance = lambda x: max(x) / (sum(x) / len(x))  # noqa: E731
    out = []
    for step, (r0, r1) in enumerate(rows, 1):
        p = plan(r0 + [seq + b for b in r1[1:]], 2, eps=opts.eps, min_chunk=opts.min_chunk,
                 overhead=planner_overhead(opts), row_bytes=row_bytes, speed=speed)
        cudnn, triton = [0, 0], [0, 0]
        for t in p.tasks:
            c, tr = speed.by_kernel(t.q_end - t.q_start, t.q_end - t.kv_start, True)
            cudnn[t.server] += c
            triton[t.server] += tr
        fwd = [c + FORWARD * t for c, t in zip(cudnn, triton)]
        bwd = [c + BACKWARD * t for c, t in zip(cudnn, triton)]
        out.append({"step": step, "forward": round(imbalance(fwd), 3), "backward": round(imbalance(bwd), 3),
                    "cudnn_G": [round(x / 1e9, 3) for x in cudnn], "triton_G": [round(x / 1e9, 3) for x in triton],
                    "plan_before": round(p.initial_imbalance, 3), "plan_after": round(p.imbalance, 3),
                    "moved_MB": round(p.bytes_moved / 1e6, 1)})
        print(json.dumps(out[-1]))
    later = out[2:]  # the benchmarks' mean skips steps 1-2
    mean = lambda key: sum(r[key] for r in later) / len(later)  # noqa: E731
    print(json.dumps({"steps_3+": {"forward": round(mean("forward"), 3), "backward": round(mean("backward"), 3),
                                   "weighted": round((mean("forward") + BACKWARD_TIME * mean("backward"))
                                                     / (1 + BACKWARD_TIME), 3),
                                   "moved_MB": round(mean("moved_MB"), 1)}}))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "prefix"]
    main(*(int(a) for a in args[:2]), *(float(a) for a in args[2:4]), prefix="prefix" in sys.argv[1:])
