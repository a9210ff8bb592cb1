"""Where one rank's GPU stood still during a profiled step (a torch.profiler Chrome trace, as
`logging.profile_step` with `logging.profile_trace=true` writes it).

Compute = every kernel, copy and memset except NCCL's; a gap is a stretch without compute. A gap
is `host` when the kernel after it was launched after the gap began (the GPU waited for the host;
the enclosing CPU ops of that launch say what the host was doing) and `comm` when it was launched
earlier but waited for a collective. Prints totals and the longest gaps; writes JSON.

    python docs/benchmarks/trace_gaps.py TRACE.json [OUT.json] [MIN_GAP_US]
"""
import bisect
import json
import sys
from collections import defaultdict


def _intervals(events):
    out = []
    for e in sorted(events, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e.get("dur", 0)
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t)
        else:
            out.append([s, t])
    return out


def main(path, out_path=None, min_gap=200.0):
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    nccl = [e for e in gpu if "nccl" in e["name"].lower()]
    compute = sorted((e for e in gpu if "nccl" not in e["name"].lower()), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    op_starts = [e["ts"] for e in ops]
    if not compute:
        sys.exit(f"{path}: no GPU kernels in this trace (a CPU run, or a profile without CUDA activity)")
    busy = _intervals(compute)
    comm = _intervals(nccl)
    span = busy[-1][1] - busy[0][0]
    starts = [e["ts"] for e in compute]

    def enclosing(ts):  # the outermost CPU ops running at host time ts (ops start before ts, end after)
        i = bisect.bisect_right(op_starts, ts)
        stack = [e for e in ops[max(0, i - 4000):i] if e["ts"] + e.get("dur", 0) >= ts]
        return [e["name"] for e in sorted(stack, key=lambda e: -e.get("dur", 0))[:4]]

    def overlap(a, b, ivs):
        return sum(max(0, min(b, t) - max(a, s)) for s, t in ivs if t > a and s < b)

    gaps, totals = [], defaultdict(float)
    for (_, a), (b, _) in zip(busy, busy[1:]):
        length = b - a
        nxt = compute[bisect.bisect_left(starts, b)]
        launch = launches.get(nxt["args"].get("correlation"))
        late = launch is not None and launch["ts"] > a
        kind = "host" if late else "comm" if overlap(a, b, comm) > 0.5 * length else "other"
        totals[kind] += length
        if length >= min_gap:
            prev = max((e for e in compute[:bisect.bisect_left(starts, b)] if e["ts"] + e.get("dur", 0) <= a + 1),
                       key=lambda e: e["ts"] + e.get("dur", 0), default=None)
            gaps.append(dict(us=round(length, 1), kind=kind, at_ms=round((a - busy[0][0]) / 1e3, 3),
                             before=prev["name"][:80] if prev else None, after=nxt["name"][:80],
                             host=enclosing(launch["ts"]) if late else None))
    result = dict(span_ms=round(span / 1e3, 3), compute_ms=round(sum(t - s for s, t in busy) / 1e3, 3),
                  nccl_ms=round(sum(t - s for s, t in comm) / 1e3, 3),
                  gap_ms={k: round(v / 1e3, 3) for k, v in totals.items()},
                  longest=sorted(gaps, key=lambda g: -g["us"])[:40])
    print(json.dumps({k: v for k, v in result.items() if k != "longest"}))
    for g in result["longest"][:25]:
        print(g)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3]), *(float(x) for x in sys.argv[3:4]))
