"""How balanced disagg's one plan leaves each direction, on the CPU (no GPU, the planner's own model).

The plan weighs a score pair on the Triton kernel `triton_cost` cuDNN pairs (planner.TRITON_COST) for
both directions, while the forward runs Triton pairs at another ratio than the backward. For batches
of DistCA's mixes on 2 ranks (dp_cp, 64k / 128k tokens per rank, llama_1b's 32 heads at head dim 64)
this prints each direction's max/mean of the modelled server loads, and the modelled attention time of
a layer (max forward + BWD_TIME x max backward, each direction waiting for its slowest server) over
its balanced ideal, for several planner weights and for the best weight chosen per batch.

    python3 docs/benchmarks/disagg_direction_balance.py [FWD_RATIO BWD_RATIO BWD_TIME]

Defaults: the forward and backward ratios measured on 2 H100 before the TMA kernels (planner.py:
1.06, 1.74) and a backward 2.6x the forward; the answer is only as good as these.
"""
import random
import sys

from seqpar.attention.disagg.planner import TASK_OVERHEAD, KernelSpeed, plan_owned
from seqpar.bench.disagg import load_mix
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len
from seqpar.kernels.flash_attn.split_tasks import cudnn_prefix

WEIGHTS = (1.06, 1.3, 1.55, 1.74, 2.0)


def batch(lens, rng, row):
    bounds = [0]
    while bounds[-1] < row:
        bounds.append(min(row, bounds[-1] + rng.choice(lens)))
    return bounds


def layer_time(p, speed, fwd, bwd, bwd_time):
    """(forward max/mean, backward max/mean, layer time over the balanced ideal) of a plan."""
    F, B = [0.0] * len(p.loads), [0.0] * len(p.loads)
    for t in p.tasks:
        fast, slow = speed.by_kernel(t.q_end - t.q_start, t.q_end - t.kv_start, True)
        F[t.server] += fast + fwd * slow + TASK_OVERHEAD
        B[t.server] += fast + bwd * slow + TASK_OVERHEAD
    mf, mb = sum(F) / len(F), sum(B) / len(B)
    return max(F) / mf, max(B) / mb, (max(F) + bwd_time * max(B)) / (mf + bwd_time * mb)


def main(fwd=1.06, bwd=1.74, bwd_time=2.6, batches=40):
    lo, hi, prefix = min_doc_len(32), max_doc_len(32, 64, 2), cudnn_prefix()
    for mix in ("wlbllm", "prolong"):
        lens = load_mix(mix)
        for per_rank in (65536, 131072):
            rng, rows = random.Random(0), {w: [] for w in WEIGHTS}
            for _ in range(batches):
                bounds = batch(lens, rng, 2 * per_rank)
                for w in WEIGHTS:
                    speed = KernelSpeed(lo, hi, prefix, w)
                    p = plan_owned(bounds, [[(0, per_rank)], [(per_rank, 2 * per_rank)]], eps=0.02, speed=speed)
                    rows[w].append(layer_time(p, speed, fwd, bwd, bwd_time))
            mean = lambda xs: sum(xs) / len(xs)
            print(f"{mix} {per_rank // 1024}k per rank: weight -> forward, backward max/mean, layer over ideal")
            for w, r in rows.items():
                print(f"  {w:4}: {mean([x[0] for x in r]):.4f} {mean([x[1] for x in r]):.4f} {mean([x[2] for x in r]):.4f}")
            best = [min(rows[w][i][2] for w in WEIGHTS) for i in range(batches)]
            print(f"  the best weight per batch: layer over ideal {mean(best):.4f}")


if __name__ == "__main__":
    main(*map(float, sys.argv[1:4]))
