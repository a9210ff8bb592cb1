"""Probe: do a 2-rank ring's consecutive kernel calls lose their last, partial wave (the tail)?

One GPU runs what one rank of a ring of 2 computes at 32k (zigzag, causal, keep: `ring.py`),
bf16 H=32 D=128: forward = the own shard's 16k causal call, then the remote rectangle (rank 0:
its later 8k chunk against the peer's 16k rows; rank 1: its 16k rows against the peer's 8k);
backward = the rectangle, then the own call. Timed three ways, ms per fwd+bwd (median of 15):
`serial` (one stream, as the ring runs now), `overlap` (each pass's second call on a side stream
that waits only for what the first call's inputs waited for, so its CTAs fill the SMs the first
call's last wave leaves idle) and `overlap_hi` (the same, the first call on a high-priority stream,
so the filler never delays it). Beside them the one-GPU 32k fwd+bwd of the same family, halved.

usage: python3 ring_tail_probe_gpu.py OUT.json [families...]   (default: flash triton cudnn)
"""
import json
import os
import statistics
import sys

import torch

from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward

S, H, D, DT = 32768, 32, 128, torch.bfloat16
HALF, QUARTER = S // 2, S // 4


def _rand(*shape):
    return torch.randn(*shape, device="cuda", dtype=DT)


def rank_case(rank):
    """(own q, k, v, do) of 16k rows, the rectangle's (query rows slice, peer k, v)."""
    own = [_rand(1, HALF, H, D) for _ in range(4)]
    if rank == 0:
        return own, slice(QUARTER, HALF), [_rand(1, HALF, H, D) for _ in range(2)]
    return own, slice(0, HALF), [_rand(1, QUARTER, H, D) for _ in range(2)]


def run(rank, mode, case):
    (q, k, v, do), rows, (pk, pv) = case
    main = torch.cuda.current_stream()
    first = SIDE_HI if mode == "overlap_hi" else main
    start = torch.cuda.Event()
    start.record(main)
    # forward: own causal, then the rectangle
    first.wait_event(start)
    with torch.cuda.stream(first):
        o_own, l_own = flash_attn(q, k, v, causal=True, return_lse=True)
    second = main if mode == "serial" else SIDE
    second.wait_event(start)
    with torch.cuda.stream(second):
        o_rem, l_rem = flash_attn(q[:, rows], pk, pv, causal=False, return_lse=True)
    main.wait_stream(first)
    main.wait_stream(second)
    mid = torch.cuda.Event()
    mid.record(main)
    # backward: the rectangle, then own causal (the merge's outputs stand in for o and lse)
    first.wait_event(mid)
    with torch.cuda.stream(first):
        g_rem = flash_attn_backward(do[:, rows], q[:, rows], pk, pv, o_rem, l_rem, causal=False)
    second.wait_event(mid)
    with torch.cuda.stream(second):
        g_own = flash_attn_backward(do, q, k, v, o_own, l_own, causal=True)
    main.wait_stream(first)
    main.wait_stream(second)  # every stream's later work waits for `start` / `mid`: buffers reuse safely
    return g_own, g_rem


def single(case):
    q, k, v, do = case
    o, l = flash_attn(q, k, v, causal=True, return_lse=True)
    return flash_attn_backward(do, q, k, v, o, l, causal=True)


def timed(fn, reps=15, warm=3):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return round(statistics.median(times), 3), round(min(times), 3)


SIDE = SIDE_HI = None


def main():
    global SIDE, SIDE_HI
    out, families = sys.argv[1], sys.argv[2:] or ["flash", "triton", "cudnn"]
    SIDE = torch.cuda.Stream()
    SIDE_HI = torch.cuda.Stream(priority=-1)
    torch.manual_seed(0)
    full = [_rand(1, S, H, D) for _ in range(4)]
    cases = {r: rank_case(r) for r in (0, 1)}
    rows = []
    for fam in families:
        os.environ["SEQPAR_ATTN_KERNEL"] = fam
        row = dict(family=fam, S=S, H=H, D=D)
        try:
            med, best = timed(lambda: single(full))
            row["single_half_ms"] = round(med / 2, 3)
            for r in (0, 1):
                ref = [t.float() for t in (*run(r, "serial", cases[r])[0], *run(r, "serial", cases[r])[1])]
                for mode in ("serial", "overlap", "overlap_hi"):
                    got = [t.float() for t in (*run(r, mode, cases[r])[0], *run(r, mode, cases[r])[1])]
                    torch.cuda.synchronize()
                    diff = max((a - b).abs().max().item() for a, b in zip(got, ref))
                    row[f"rank{r}_{mode}_ms"], row[f"rank{r}_{mode}_min_ms"] = timed(lambda: run(r, mode, cases[r]))
                    row[f"rank{r}_{mode}_maxdiff"] = diff
            for mode in ("serial", "overlap", "overlap_hi"):
                worst = max(row[f"rank{r}_{mode}_ms"] for r in (0, 1))
                row[f"{mode}_eff_vs_single"] = round(row["single_half_ms"] / worst, 4)
        except Exception as e:  # one family failing must not hide the others
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(out, "w") as f:
        json.dump(dict(rows=rows, device=torch.cuda.get_device_name()), f, indent=1)


if __name__ == "__main__":
    main()
