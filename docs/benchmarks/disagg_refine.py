"""Issue 10, CPU only: would moving work between the servers after planning, judged by each direction's
slowest server, balance both directions of disagg's one plan? Per step of `disagg_dp_cp_gpu.sh`'s
64k lognormal rows (eps 0.02, the planner at triton_cost 1.7): the plan, then greedy single moves
(a task or a piece of it, `planner._candidates` at 1/1 .. 1/32 of its pairs, either way) while they
lower J = max forward + 2.6 x max backward (Triton pairs at FWD / BWD cuDNN pairs); the step model of
`disagg_phases.py` (base 1.408 s + 0.2567 s per G weighted pairs, fitted on the twelfth session's
as0 / as1 lanes) turns J into a ratio to the balanced ideal.

    PYTHONPATH=docs/benchmarks python docs/benchmarks/disagg_refine.py FWD BWD

2026-11-27 (fourteenth session): at FWD, BWD = 1.10, 1.90 (measured on step 9, 2026-11-27-gpu-14th/call2)
the plans model 1.022x, refined 1.019x for 15% more bytes (124 against 108 MB a layer's forward);
at 1.06, 1.74: 1.017 -> 1.016 (+17%). Lowering a sum of squared gaps instead made it worse (1.034x):
a piece cut from a document leaves a piece over a prefix, Triton work, on one side or the other, so
the directions cannot be balanced by moving work; the Triton kernel's ratio is the lever. Not kept in
the planner.
"""
import sys

from cudnn_shapes import _rows
from disagg_phases import BACKWARD_TIME

from seqpar.attention.disagg import KernelSpeed, plan
from seqpar.attention.disagg.options import DisaggOptions, planner_overhead
from seqpar.attention.disagg.planner import Task, _candidates, _Model
from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len
from seqpar.parallel.sharding import local_ranges

SEQ, EPS, STEPS = 65536, 0.02, 18
BASE_S, S_PER_PAIR = 1.408, 0.2567e-9  # disagg_phases.py's step model on the twelfth session's lanes


class Loads:
    """Each server's forward and backward work of a task list [server, q_start, q_end, kv_start, owner]."""

    def __init__(self, speed, overhead, fwd, bwd):
        self.speed, self.overhead, self.fwd, self.bwd = speed, overhead, fwd, bwd

    def of(self, tasks):
        f, b = [0.0, 0.0], [0.0, 0.0]
        for s, qs, qe, d, _ in tasks:
            cudnn, triton = self.speed.by_kernel(qe - qs, qe - d, True)
            f[s] += cudnn + self.overhead + self.fwd * triton
            b[s] += cudnn + self.overhead + self.bwd * triton
        return f, b

    def j(self, tasks):
        """The layer's attention time in cuDNN forward pairs: each direction waits for its slowest server."""
        f, b = self.of(tasks)
        return max(f) + BACKWARD_TIME * max(b)

    def own(self, bounds):
        """A rank running its own row, every document a task of its own (the ideal's lanes)."""
        return self.j([[0, a, b, a, 0] for a, b in zip(bounds, bounds[1:])])


def refine(tasks, loads, model, min_chunk):
    """Greedy single moves (a task or a piece of it, to the other server) while J falls (ties: while
    the two directions' gaps shrink), 200 at most."""
    tasks = [list(t) for t in tasks]
    for _ in range(200):
        f, b = loads.of(tasks)
        if max(f) <= (1 + EPS) * sum(f) / 2 and max(b) <= (1 + EPS) * sum(b) / 2:
            return tasks
        score = lambda ts: (loads.j(ts), sum(abs(x - y) for x, y in zip(*loads.of(ts))))  # noqa: E731
        best, now = None, score(tasks)
        for i, (s, qs, qe, d, o) in enumerate(tasks):
            for frac in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125):
                for moved, keep in _candidates(model, qs, qe, d, max(1, (qe - qs) * (qe - d) * frac / 2), min_chunk):
                    new = tasks[:i] + tasks[i + 1:] + [[s, a, e, d, o] for a, e in keep] + \
                        [[1 - s, a, e, d, o] for a, e in moved]
                    got = score(new)
                    if got < (best[0] if best else now):
                        best = (got, new)
        if best is None:
            return tasks
        tasks = best[1]
    return tasks


def main(fwd, bwd):
    rows, heads, head_dim = _rows(SEQ, STEPS)
    opts = DisaggOptions(eps=EPS, triton_cost=1.7)
    speed = KernelSpeed(min_doc_len(heads), max_doc_len(heads, head_dim, 2), False, opts.triton_cost)
    row_bytes, overhead = (heads * 2 * head_dim * 2, 8 * 2 * head_dim * 2), planner_overhead(opts)
    loads = Loads(speed, overhead, fwd, bwd)
    out = []
    for step, (r0, r1) in enumerate(rows, 1):
        bounds = r0 + [SEQ + b for b in r1[1:]]
        p = plan(bounds, 2, eps=EPS, min_chunk=opts.min_chunk, overhead=overhead, row_bytes=row_bytes, speed=speed)
        owned = [sorted(local_ranges(bounds[-1], 2, r, "contiguous")) for r in range(2)]
        model = _Model(True, overhead, {a: b for a, b in zip(bounds, bounds[1:])}, owned, row_bytes, speed)
        tasks = [(t.server, t.q_start, t.q_end, t.kv_start, t.owner) for t in p.tasks]
        refined = refine(tasks, loads, model, opts.min_chunk)
        ideal = BASE_S + S_PER_PAIR * (loads.own(r0) + loads.own(r1)) / 2
        moved = model.plan_bytes(sorted((Task(*t) for t in refined), key=lambda t: (t.q_start, t.server)))
        out.append(dict(step=step, plan=round((BASE_S + S_PER_PAIR * loads.j(tasks)) / ideal, 4),
                        refined=round((BASE_S + S_PER_PAIR * loads.j(refined)) / ideal, 4),
                        MB=round(p.bytes_moved / 1e6, 1), refined_MB=round(moved / 1e6, 1)))
        print(out[-1], flush=True)
    later = out[2:]  # the benchmarks' mean skips steps 1-2
    print({k: round(sum(r[k] for r in later) / len(later), 4) for k in ("plan", "refined", "MB", "refined_MB")})


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]))
