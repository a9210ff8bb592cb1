"""Where one lightning-attention fwd+bwd spends its time at each length (B=1, H=32, D=128, bf16):
CUDA-event ms per call, then torch.profiler's GPU ms per kernel per call, and the GPU's busy share.
Written for the question of issue 4: why a 32k-token call costs more per token than a 64k one;
a length may name a batch (`4x16384`: four rows of 16k, issue 5's flatness question, where one
64k row's backward ran 22% slower than four 16k rows').

    python3 docs/benchmarks/lightning_profile.py OUTDIR 32768 65536 4x16384

SEGMENTS=1024,2048,4096 runs every length at each of these caps of the segment length
(`MAX_SEGMENT`, which only sets the grid): the question of LASP-2's 256k gap, where one GPU runs
128k tokens 4% slower per token than 256k.
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from seqpar import kernels


def main(out_dir, lens):
    from seqpar.kernels.lightning_attn import triton as lightning_triton

    caps = [int(c) for c in os.environ.get("SEGMENTS", "").split(",") if c]
    result = {}
    for cap in caps or [lightning_triton.MAX_SEGMENT]:
        lightning_triton.MAX_SEGMENT = cap
        for spec, row in _lengths(lens).items():
            result[f"{spec}@max_segment={cap}" if caps else spec] = row
    with open(f"{out_dir}/lightning_profile.json", "w") as f:
        json.dump(result, f, indent=1)


def _tail(o):
    """The last 4 tokens' outputs of head 0, rounded: after every segment boundary of the row."""
    return [round(x, 3) for x in o[-1, -4:, 0, :8].float().flatten().tolist()]


def _lengths(lens):
    from seqpar.kernels.lightning_attn.triton import segment_length

    H, D, dev = 32, 128, torch.device("cuda")
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    result = {}
    for spec in lens:
        B, S = (int(x) for x in spec.split("x")) if "x" in spec else (1, int(spec))
        torch.manual_seed(0)  # the same inputs at every segment cap: their outputs must agree
        q, k, v, do = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()

        def step():
            kernels.lightning_attn(q, k, v, lam)[0].backward(do)
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            step()
        end.record()
        torch.cuda.synchronize()
        wall = start.elapsed_time(end) / 20
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        per = {}
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", 0)
            if t > 0:
                per[e.key[:70]] = (round(t / 5 / 1e3, 4), e.count // 5)
        busy = sum(t for t, _ in per.values())
        result[spec] = dict(ms=round(wall, 4), Mtok_s=round(B * S / wall / 1e3, 3), gpu_busy_ms=round(busy, 4),
                            seg_len=segment_length(B * S, H, dev), output_tail=_tail(kernels.lightning_attn(q, k, v, lam)[0]),
                            kernels=dict(sorted(per.items(), key=lambda kv: -kv[1][0])))
        print(spec, json.dumps(result[spec], indent=1), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
