"""A/B of two versions of kernels/flash_attn/triton.py in ONE process on ONE GPU (device tool).

    python3 docs/benchmarks/flash_file_ab_gpu.py OTHER_TRITON_PY OUT.json [D:S:layout ...]

The installed `seqpar.kernels.flash_attn.triton` ("installed") against OTHER_TRITON_PY loaded beside it
as a second module ("other": its own autotuners and compiled kernels), fwd+bwd of `flash_attn_triton`,
causal, bf16, H=32, each case timed once per round, the two alternating (3 rounds, medians), so a
clock drift or a neighbour hits both. Cases: head dim, tokens, `dense` (one causal row) or `packed`
(lognormal documents, as the kernels benchmark draws them). Also the largest difference between
the two versions' outputs and gradients (the same math: should be ~0) and each version's tuned picks.
Written for b959a35 (the dk/dv kernel's K/V tiles through TMA descriptors), 2026-11-28.
"""
import importlib.util
import json
import statistics
import sys

import torch
from triton.testing import do_bench

from seqpar.bench._flash_cases import case_inputs
from seqpar.bench.ring import lognormal_lengths
from seqpar.kernels.flash_attn import triton as installed

H, ROUNDS = 32, 3


def load_other(path):
    spec = importlib.util.spec_from_file_location("seqpar.kernels.flash_attn._ab_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tuned(mod):
    return {name: sorted({str(c).split(", num_ctas")[0] for c in getattr(getattr(mod, name), "cache", {}).values()})
            for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")}


def main():
    other_path, out = sys.argv[1], sys.argv[2]
    cases = sys.argv[3:] or ["128:16384:dense", "64:65536:packed", "128:65536:packed", "64:16384:dense"]
    mods = {"installed": installed, "other": load_other(other_path)}
    rows = []
    for case in cases:
        d, S, layout = case.split(":")
        d, S = int(d), int(S)
        lens = None if layout == "dense" else lognormal_lengths(S, seed=S)
        q, k, v, do, useful, cu = case_inputs(S, lens, torch.device("cuda"), H, head_dim=d)
        fns = {n: (lambda m=m: m.flash_attn_triton(q, k, v, causal=True, cu_seqlens=cu).backward(do))
               for n, m in mods.items()}
        res = {}
        for n, m in mods.items():  # first call tunes and compiles: not timed
            o = m.flash_attn_triton(q, k, v, causal=True, cu_seqlens=cu)
            res[n] = (o.detach(), *torch.autograd.grad(o, (q, k, v), do))
        diff = {g: (a.float() - b.float()).abs().max().item()
                for g, a, b in zip(("out", "dq", "dk", "dv"), res["installed"], res["other"])}
        times = {n: [] for n in mods}
        for _ in range(ROUNDS):
            for n, fn in fns.items():
                times[n].append(do_bench(fn, warmup=25, rep=200, return_mode="median", grad_to_none=[q, k, v]))
        row = dict(case=case, D=d, S=S, layout=layout, n_docs=1 if lens is None else len(lens),
                   max_abs_diff=diff, ms={n: [round(t, 3) for t in ts] for n, ts in times.items()})
        for n, ts in times.items():
            row[f"{n}_ms"] = round(statistics.median(ts), 3)
            row[f"{n}_tflops"] = round(3.5 * useful / statistics.median(ts) / 1e9, 1)
        row["other_over_installed"] = round(row["installed_ms"] / row["other_ms"], 4)
        row["tuned"] = {n: tuned(m) for n, m in mods.items()}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out, "w") as f:  # after every case: a run cut by its timeout keeps what it measured
            json.dump(dict(device=torch.cuda.get_device_name(), other=other_path, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
