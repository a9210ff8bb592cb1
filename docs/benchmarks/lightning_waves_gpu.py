"""Do the lightning kernels lose a last, part-filled wave of programs? (issues 4 and 5; one GPU)

A lightning kernel's grid is one program per (segment, head, column block): at H=32, two column
blocks and one program per SM (8 warps, ~210 registers), a 512k-token row of 8192-token segments
makes 4096 programs, 31.03 waves of an H100's 132 SMs: the 32nd wave runs 4 programs while 128
SMs wait, ~3% of the call, where 1M tokens (62.06 waves) lose ~1.5%: the gap of LASP-2 at 1M
(0.960-0.966; each rank runs 512k against the one GPU's 1M). A segment length that is a multiple of
64 but not a power of two can fill the last wave (the kernels take any such length).

For each length: fwd+bwd (torch.autograd.grad, bf16, B=1, H=32, D=128) at the heuristic's segment
length (`segment_length`) and at the lengths a wave model picks, median of 3 windows of ITERS calls;
the autotuner's picks (Z_SPLIT, warps) of the three kernels; the outputs' agreement across lengths.

    python3 docs/benchmarks/lightning_waves_gpu.py OUT.json [TOKENS ...]   (default 32k 64k 256k 512k 1M)

Twentieth session (one H100, call 4; out of memory at 1M before its JSON, rows in the log): 512k 8192
39.72 ms, 7936 38.19, 15872 38.16; 256k 8192 19.17, 7936 19.26. Then on 2 H100 (call 5,
lasp_waves_gpu.py) the 512k kernel at 8192 ran 37.85-38.09 ms and LASP-2 at 1M was no faster with
the whole-wave segments (38.54-38.60 ms against 38.37-38.39): the first 512k figure was noise.
"""
import json
import math
import sys

import torch


def candidates(tokens, heads, sms):
    """The heuristic's segment length and the lengths (multiples of 64, within a factor 2 of it)
    whose programs at two column blocks fill whole waves of `sms` (one or two programs per SM): a
    segment count n with n * heads * 2 a multiple of sms (the last, short segment of the remainder
    fills in beside the rest)."""
    from seqpar.kernels.lightning_attn.triton import segment_length
    base = segment_length(tokens, heads, torch.device("cuda", 0))
    picks = {base}
    for n in range(1, tokens // 1024 + 1):
        seg = tokens // n // 64 * 64
        if n * heads * 2 % sms == 0 and base // 2 <= seg <= 2 * base:
            picks.add(seg)
    return base, sorted(picks)


def time_it(fn, iters):
    windows = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        windows.append(start.elapsed_time(end) / iters)
    return sorted(windows)[1]


def main(out, lens):
    from seqpar.kernels.lightning_attn import triton as lt
    H, D, dev = 32, 128, torch.device("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    rows = {}
    for T in lens:
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        base, segs = candidates(T, H, sms)
        row, ref = {"heuristic": base, "sms": sms}, None
        for seg in segs:
            def step():
                o, _ = lt.lightning_attn_triton(q, k, v, lam, seg_len=seg)
                return torch.autograd.grad(o, (q, k, v), do)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            ms = time_it(step, max(3, int(2000 / T * 64)))
            with torch.no_grad():  # a 1M-token output is 8 GiB: keep its last tokens only (past every boundary)
                o = lt.lightning_attn_triton(q, k, v, lam, seg_len=seg)[0][:, -64:].clone()
            ref = o if ref is None else ref
            row[str(seg)] = dict(ms=round(ms, 4), Mtok_s=round(T / ms / 1e3, 3), waves_z2=round(
                math.ceil(T / seg) * H * 2 / sms, 2), max_diff_vs_first=float((o.float() - ref.float()).abs().max()))
            print(T, seg, row[str(seg)], flush=True)
        row["picks"] = {name: {str(key): str(cfg) for key, cfg in getattr(kern.tuner, "cache", {}).items()}
                        for name, kern in (("output", lt._segment_output), ("state", lt._segment_state))}
        rows[T] = row
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], [int(x) for x in sys.argv[2:]] or [32768, 65536, 262144, 524288, 1048576])
