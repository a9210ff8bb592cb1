"""What holds the memory at the peak: `logging.memory_snapshot=true`.

torch's allocator can record every allocation and free with its Python stack
(`torch.cuda.memory._record_memory_history`). seqpar records from before the model is built to
the end of step 1, where a run's peak is (the optimizer states appear in its step), then replays
the trace to the moment the allocated bytes were highest and sums what was live then by the
innermost seqpar frame that allocated it: the live tensors of the peak, named by the code that
made them. That is what `seqpar.memory`'s estimate must add up to; the profiler and
`max_memory_allocated` say only how much, not what.

Writes `run_dir/memory/peak_rank<R>.txt` (the table) and `.json`, and with
`logging.memory_snapshot_pickle=true` the raw snapshot for https://pytorch.org/memory_viz.
The allocated bytes follow torch's `allocated_bytes` statistic: an alloc adds its block, a free
request (not the deferred completion of a block used on another stream) subtracts it.
"""
from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path

MAX_ENTRIES = 2_000_000  # trace events kept (a 16-layer step at 512k tokens makes ~10^5)
OURS = ("/seqpar/", "/kernels/")  # frames of this repository


def start(device) -> bool:
    """Record allocations with Python stacks from now on (CUDA only); whether it records."""
    import torch

    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")
    return True


def site(frames: list[dict]) -> str:
    """The innermost frame of this repository (file:line function), else the innermost frame."""
    for f in frames:
        name = f.get("filename", "")
        if any(part in name for part in OURS):
            short = name[max(name.rfind(part) for part in OURS if part in name) + 1:]
            return f"{short}:{f.get('line')} {f.get('name')}"
    if frames:
        f = frames[0]
        return f"(outside seqpar) {Path(f.get('filename', '?')).name}:{f.get('line')} {f.get('name')}"
    return "(no Python frame: autograd engine, C++)"


def peak_breakdown(trace: list[dict], top: int = 30) -> dict:
    """Replay one device's trace: the peak of allocated bytes, and what was live then, by site."""
    live, allocated, peak, at = {}, 0, 0, None
    for i, event in enumerate(trace):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            allocated += event["size"]
            if allocated > peak:
                peak, at = allocated, i
        elif action == "free_requested" and event["addr"] in live:
            allocated -= live.pop(event["addr"])["size"]
    # the live set at the peak: replay again up to it (cheaper than copying the set at every new peak)
    live = {}
    for event in trace[:(at + 1) if at is not None else 0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    by_site = defaultdict(lambda: [0, 0])
    for event in live.values():
        entry = by_site[site(event.get("frames") or [])]
        entry[0] += event["size"]
        entry[1] += 1
    rows = sorted(([name, size, n] for name, (size, n) in by_site.items()), key=lambda r: -r[1])
    return {"peak_bytes": peak, "event_index": at, "events": len(trace), "sites": len(rows),
            "top": [{"site": name, "bytes": size, "blocks": n} for name, size, n in rows[:top]],
            "rest_bytes": sum(size for _, size, _ in rows[top:])}


def table(breakdown: dict) -> str:
    gib = 2**30
    lines = [f"peak allocated {breakdown['peak_bytes'] / gib:.3f} GiB at trace event {breakdown['event_index']} "
             f"of {breakdown['events']}; live then, by the innermost seqpar frame that allocated it:"]
    lines += [f"  {r['bytes'] / gib:8.3f} GiB  {r['blocks']:6d} blocks  {r['site']}" for r in breakdown["top"]]
    lines.append(f"  {breakdown['rest_bytes'] / gib:8.3f} GiB  (the other {breakdown['sites'] - len(breakdown['top'])} sites)")
    return "\n".join(lines)


def dump(run_dir, rank: int, *, keep_pickle: bool = False) -> dict:
    """Stop recording; write this rank's peak breakdown (and the raw snapshot if asked)."""
    import torch

    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    out = Path(run_dir) / "memory"
    out.mkdir(parents=True, exist_ok=True)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    breakdown = peak_breakdown(trace)
    breakdown["max_memory_allocated"] = torch.cuda.max_memory_allocated()
    (out / f"peak_rank{rank}.txt").write_text(table(breakdown) + "\n")
    (out / f"peak_rank{rank}.json").write_text(json.dumps(breakdown, indent=1) + "\n")
    if keep_pickle:
        with open(out / f"snapshot_rank{rank}.pickle", "wb") as f:
            pickle.dump(snapshot, f)
    return breakdown
