"""Does a state entering the documents (HAS_EDGE_IN: the forward's initial state, the backward's
dFinal) slow the lightning kernels' output passes? LASP-2's profiles (2026-11-28, call 1) showed
the rank that receives states running its output passes 2-9% over the kernel alone.

    python3 docs/benchmarks/lightning_edge_gpu.py OUT.json [TOKENS ...]

One row of TOKENS tokens, H=32, D=128, bf16. Variants, timed in alternating rounds (CUDA events
around the forward and the backward separately, median over rounds of 10 calls each):
plain; init (initial_state given: the forward's and the dq pass's edge-in); init+final (also the
final state out, with a gradient: the dk/dv passes' edge-in).
"""
import json
import statistics
import sys

import torch

from seqpar.kernels.lightning_attn.triton import lightning_attn_triton


def main(out_path, *tokens):
    tokens = [int(t) for t in tokens] or [32768, 524288]
    H, D, dev = 32, 128, "cuda"
    rows = []
    for S in tokens:
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g) * 0.5 for _ in range(3))
        for t in (q, k, v):
            t.requires_grad_(True)
        lam = -torch.linspace(0.01, 0.2, H, device=dev)
        init = torch.randn(1, H, D, D, device=dev, generator=g) * 0.1
        do = torch.randn(1, S, H, D, device=dev, dtype=torch.bfloat16, generator=g)
        dfin = torch.randn(1, H, D, D, device=dev, generator=g) * 0.1

        def variant(name):
            def run():
                o, fin = lightning_attn_triton(q, k, v, lam, initial_state=None if name == "plain" else init,
                                               output_final_state=name == "init+final")
                return o, fin
            return run

        def time_one(run, iters=10):
            fwd, bwd = [], []
            for _ in range(iters):
                a, b, c = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                a.record()
                o, fin = run()
                b.record()
                grads = [do] + ([dfin] if fin is not None else [])
                torch.autograd.backward([o] + ([fin] if fin is not None else []), grads)
                c.record()
                torch.cuda.synchronize()
                fwd.append(a.elapsed_time(b))
                bwd.append(b.elapsed_time(c))
                q.grad = k.grad = v.grad = None
            return statistics.median(fwd), statistics.median(bwd)

        names = ["plain", "init", "init+final"]
        for name in names:  # compile and tune outside the rounds
            time_one(variant(name), 2)
        rounds = {n: [] for n in names}
        for _ in range(5):
            for name in names:
                rounds[name].append(time_one(variant(name)))
        for name in names:
            f = statistics.median(r[0] for r in rounds[name])
            b = statistics.median(r[1] for r in rounds[name])
            row = {"tokens": S, "variant": name, "fwd_ms": round(f, 4), "bwd_ms": round(b, 4),
                   "rounds": rounds[name]}
            print(json.dumps({k: v for k, v in row.items() if k != "rounds"}), flush=True)
            rows.append(row)
    json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
