"""Issue 5's flatness: the lightning kernel with its boundary states made inside the output passes
(SEQPAR_LIGHTNING_CHAIN=1) against the three-kernel default, alternating in one process.

A 64k row pays a state pass (k, v forward; q, dO backward) that a 4k row skips: on one H200 the
kernels' sums were 3.40 ms for a 64k row against 2.91 for 16 rows of 4k (0.86; the goal 0.9), the
state passes 0.48 ms at the HBM roofline (twenty-sixth session, `lightning_profile.py`). Chained,
each segment computes its own contribution in the same program that then writes its outputs, so the
memory-bound state work runs beside other segments' output work instead of in launches before it.

    python3 docs/benchmarks/lightning_chain_gpu.py OUT.json 16x4096 4x16384 65536 262144

Per row shape and round (3 rounds; the default, chained, chained at 2048- and 1024-token segments): fwd+bwd
ms (CUDA events, 10 calls back to back after 3; and triton's do_bench), Mtok/s, and the outputs' and gradients'
relative difference from the default's; then each variant's flatness (min / max Mtok/s over the shapes).
The thirtieth session's run (one H200) found every chained variant slower. Longer segments than the default's
8192 (VARIANTS=default,seg16384,seg32768,seg65536) leave more of a long row's tokens in documents' last segments,
which the state pass skips: at 64k, 1/8 of the row at 8192, 1/2 at 32768, with fewer programs in the grid (on one
32k row, twenty-fifth session: 2 segments of 16384 ran 3.88 ms against 2.42 at 8 of 4096). Thirty-first
session (one H200, 2026-11-28-gpu-31st/call1): 16384 won where it leaves 128 segment-heads (4 rows of 16k: one
segment a row, no state pass, 22.0 Mtok/s against 19.5; one 64k row 18.3 against 17.8), 32768 and 65536 lost at
64k (11.3, 7.8) and tied at 256k; flatness 0.83 at best (7b5be80 made 16384 the default where the grid allows).
Shorter segments because the default length (`segment_length` before 7b5be80: 8192 at 64k tokens, 32 heads) makes
~2 waves of programs, each starting with its own segment's state read at once; with more, shorter programs
the waves desynchronise and the state reads of some run beside the output work of others.
H=32, D=128, bf16, decays as the kernels bench's.
"""
import json
import os
import sys

import torch
import triton

from lightning_rows_gpu import _time  # docs/benchmarks, this script's folder
from seqpar.kernels.lightning_attn import triton as lt


ALL_VARIANTS = [("default", "0", None), ("chain", "1", None), ("chain_seg2048", "1", 2048), ("chain_seg1024", "1", 1024),
                ("seg16384", "0", 16384), ("seg32768", "0", 32768), ("seg65536", "0", 65536)]
# VARIANTS=name,name,... picks some (default first: the others' outputs are compared with its)
VARIANTS = [v for v in ALL_VARIANTS if v[0] in os.environ.get("VARIANTS", "default,chain,chain_seg2048,chain_seg1024")
            .split(",")]


def _shape(spec):
    """"16x4096" -> (16, 4096); "65536" -> (1, 65536)."""
    return tuple(int(x) for x in spec.split("x")) if "x" in spec else (1, int(spec))


def main(out, specs, rounds=3):
    H, D, dev = 32, 128, torch.device("cuda")
    lam = -torch.linspace(1, 8, H, device=dev).exp2().reciprocal()
    rows, best = [], {}  # best: (spec, variant) -> ms
    for spec in specs:
        B, S = _shape(spec)
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(B, S, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()

        def step(seg):
            for t in (q, k, v):
                t.grad = None
            lt.lightning_attn_triton(q, k, v, lam, seg_len=seg)[0].backward(do)

        default = None
        for r in range(rounds):
            for name, chain, seg in VARIANTS:
                os.environ[lt.CHAIN_ENV] = chain
                seg = None if seg is None or seg > S else seg
                step(seg)
                got = [lt.lightning_attn_triton(q, k, v, lam, seg_len=seg)[0].detach().float()]
                got += [t.grad.float() for t in (q, k, v)]
                default = default or got
                diff = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, default))
                ms = _time(lambda: step(seg))
                bench_ms = triton.testing.do_bench(lambda: step(seg))
                row = dict(spec=spec, round=r, variant=name, seg_len=seg or lt.segment_length(B * S, H, dev),
                           ms=round(ms, 4), do_bench_ms=round(bench_ms, 4), Mtok_s=round(B * S / ms / 1e3, 3),
                           rel_diff_vs_default=diff)
                rows.append(row)
                print(json.dumps(row), flush=True)
                best[(spec, name)] = min(best.get((spec, name), float("inf")), ms)
    os.environ.pop(lt.CHAIN_ENV, None)
    summary = {}
    for name, _, _ in VARIANTS:
        rate = {spec: _shape(spec)[0] * _shape(spec)[1] / best[(spec, name)] / 1e3 for spec in specs}
        summary[name] = dict(best_Mtok_s={s: round(x, 3) for s, x in rate.items()},
                             flatness=round(min(rate.values()) / max(rate.values()), 3))
    print(json.dumps(summary), flush=True)
    with open(out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, summary=summary), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
