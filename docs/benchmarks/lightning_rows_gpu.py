"""Issue 5's flatness: can the lightning kernel skip its state pass on long rows too?

One row's segments are walked in parallel, so a long row needs each segment's own state first (the
state pass: one more read of k, v forward and of q, dO backward, at H100's HBM roofline 0.64 ms per
64k tokens at H=32, D=128; the twenty-fifth session's profile), which a row of one segment (a 4k
row) skips: 4k rows ran 16.0 Mtok/s, one 64k row 14.0. Lightning Attention-2's own schedule walks
the whole row in one program per head and column block, no state pass, parallel over heads x
column blocks only. Here: fwd+bwd ms of `lightning_attn_triton` per row shape with (a) the default
segments and tuned configs, (b) one segment per row (`seg_len` = the row) with the output pass's
columns split in Z programs (forced config), each checked against (a)'s output.

    python3 docs/benchmarks/lightning_rows_gpu.py OUT.json 16x4096 65536 262144

OUT_CONFIGS=[C:]Z:W:S,... instead times the default segments with the output pass forced to each config
(C tokens a chunk, Z column blocks, W warps, S stages): the question of a 128-token chunk (half the
serial steps of a segment's walk, larger dots, 29% more FLOPs). It needs the chunk length in the output
pass's configs (60184f1, reverted: 128-token chunks ran 1.3x slower, twenty-fifth session call 4).

SEGS=4096,8192 instead times the default configs at each of these segment lengths (the question of
LASP-2 at 64k: a rank's 32k row runs 3% slower per token at its 4096-token segments than one GPU's
64k row at 8192, twentieth session).
"""
import os
import json
import sys

import torch
import triton

from seqpar.kernels.lightning_attn import triton as lt


def _time(fn, iters=10, warmup=3):
    """CUDA-event ms per call of `fn`, `iters` back to back after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main(out, specs):
    H, D, dev = 32, 128, torch.device("cuda")
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    default = lt._segment_output.configs
    variants = [("default", None, None)] + [(f"row_z{z}_w{w}_s{s}", z, (w, s)) for z, w, s in
                                            [(2, 8, 2), (4, 4, 2), (4, 8, 2), (8, 4, 2)]]
    segs = [int(x) for x in os.environ.get("SEGS", "").split(",") if x]
    if segs:
        variants = [("default", None, None)] + [(f"seg{n}", None, n) for n in segs]
    forced = [tuple(int(x) for x in c.split(":")) for c in os.environ.get("OUT_CONFIGS", "").split(",") if c]
    if forced:
        names = ["C{}_z{}_w{}_s{}".format(*f) if len(f) == 4 else "z{}_w{}_s{}".format(*f) for f in forced]
        variants = [("default", None, None)] + [(name, f[:-2] if len(f) == 4 else f[0], f[-2:])
                                                for name, f in zip(names, forced)]
    result = {}
    for spec in specs:
        B, S = (int(x) for x in spec.split("x")) if "x" in spec else (1, int(spec))
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        ref = None
        for name, z, opts in variants:
            if z is None:
                lt._segment_output.configs = default
                seg = opts
            else:
                meta = {"Z_SPLIT": z[1], "C": z[0]} if isinstance(z, tuple) else {"Z_SPLIT": z}
                lt._segment_output.configs = [triton.Config(meta, num_warps=opts[0], num_stages=opts[1])]
                seg = None if forced else S

            def step():
                for t in (q, k, v):
                    t.grad = None
                lt.lightning_attn_triton(q, k, v, lam, seg_len=seg)[0].backward(do)
            try:
                ms = _time(step)
                o = lt.lightning_attn_triton(q, k, v, lam, seg_len=seg)[0].detach().float()
                ref = o if ref is None else ref
                err = ((o - ref).norm() / ref.norm()).item()
                row = dict(ms=round(ms, 4), Mtok_s=round(B * S / ms / 1e3, 3), rel_diff_vs_default=err)
            except Exception as e:  # a forced config that does not fit: say so, go on
                row = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
            if z is None and name == "default":
                row["picked"] = str(getattr(lt._segment_output, "best_config", None))
            result[f"{spec} {name}"] = row
            print(spec, name, row, flush=True)
    lt._segment_output.configs = default
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=result), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
