"""`python -m seqpar.bench kernels --out FILE.json`: seqpar's kernels beside their anchors, one run.

Lightning attention (`--only lightning`): bf16, H=32, D=128, per-head decays as in
`../shared/anchors/anchors_linear.py` (B*S = 64k tokens, B = 1 from 64k on), forward and
forward+backward in Mtok/s, plus packed documents of lognormal lengths (the draw of
`anchors_varlen.py`). The anchor, measured in the same run on the same inputs: fla's
`chunk_simple_gla` with `g_gamma` when `fla` imports, else seqpar's torch reference. Needs only
torch, triton and numpy. Off CUDA it runs the interpreter-sized smoke form (`--seq-lens 256`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from seqpar.bench.ring import lognormal_lengths

H, D = 32, 128
TOKENS = 65536


def _timer(device, warmup=50, rep=300):
    """Median ms of fn(); triton's do_bench (L2 flushed, CUDA events) on CUDA, wall clock elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn, grads=None: do_bench(fn, warmup=warmup, rep=rep, return_mode="median", grad_to_none=grads)

    def wall(fn, grads=None):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return sorted(times)[1]
    return wall


def _lightning_impls(device, seg_lens=()):
    from seqpar import kernels
    from seqpar.kernels.lightning_attn.reference import lightning_attn_reference
    from seqpar.kernels.lightning_attn.triton import lightning_attn_triton

    ours = kernels.lightning_attn
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") == "1":  # CPU smoke run of the kernel
        ours = lightning_attn_triton
    impls = {"seqpar": lambda q, k, v, lam, cu: ours(q, k, v, lam, cu_seqlens=cu)[0]}
    for n in seg_lens:  # the segment length the heuristic would not pick (`segment_length`), for tuning it
        impls[f"seqpar(seg_len={n})"] = (lambda q, k, v, lam, cu, n=n:
                                         lightning_attn_triton(q, k, v, lam, cu_seqlens=cu, seg_len=n)[0])
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        impls["fla_chunk_simple_gla(g_gamma)"] = (
            lambda q, k, v, lam, cu: chunk_simple_gla(q, k, v, g_gamma=lam, scale=q.shape[-1] ** -0.5,
                                                      cu_seqlens=None if cu is None else cu.long())[0])
    except ImportError:
        impls["torch_reference"] = lambda q, k, v, lam, cu: lightning_attn_reference(q, k, v, lam, cu_seqlens=cu)[0]
    return impls


def bench_lightning(args, device):
    H, D = args.heads, args.head_dim
    from seqpar import kernels
    from seqpar.kernels.lightning_attn import triton as lt

    timer = _timer(device)
    impls = _lightning_impls(device, args.seg_lens)
    lam = -torch.linspace(1, 8, H, device=device).exp2().reciprocal()  # log-decay per head, as the anchor
    cases = [("dense", S, max(1, args.tokens // S), None) for S in args.seq_lens]
    cases += [("packed", S, 1, lognormal_lengths(S)) for S in args.packed_lens]
    rows = []
    for layout, S, B, lens in cases:
        gen = torch.Generator(device=device).manual_seed(S)
        q, k, v, do = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        cu = None if lens is None else torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=device,
                                                     dtype=torch.int32)
        backend = kernels.backend("lightning_attn", q, k, v, lam)
        outs = {}
        for name, fn in impls.items():
            if name == "torch_reference" and B * S > args.reference_max_tokens:
                continue  # the reference's per-block Python loop: minutes at 256k
            try:
                outs[name] = fn(q, k, v, lam, cu).detach()
                ms_f = timer(lambda: fn(q, k, v, lam, cu))
                ms_fb = timer(lambda: fn(q, k, v, lam, cu).backward(do), [q, k, v])
            except Exception as e:  # an anchor that cannot run a case is recorded, not fatal
                rows.append(dict(kernel=name, layout=layout, B=B, S=S, error=repr(e)[:300]))
                print(rows[-1], flush=True)
                continue
            tokens = B * S
            row = dict(kernel=name, layout=layout, B=B, S=S, H=H, D=D, dtype="bfloat16",
                       n_docs=B if lens is None else len(lens), max_doc=S if lens is None else max(lens),
                       fwd_ms=round(ms_f, 3), fwdbwd_ms=round(ms_fb, 3),
                       fwd_Mtok_s=round(tokens / ms_f / 1e3, 4), fwdbwd_Mtok_s=round(tokens / ms_fb / 1e3, 4))
            if name == "seqpar":
                row.update(backend=backend, seg_len=lt.segment_length(tokens, H, q.device))
            elif "seqpar" in outs:  # sanity: the anchor (or variant) computes the same thing on the same inputs
                ours, other = outs["seqpar"].double(), outs[name].double()
                row["rel_err_vs_seqpar"] = round(((ours - other).norm() / other.norm()).item(), 5)
            rows.append(row)
            print(row, flush=True)
        del q, k, v, do
    # what the autotuner picked, per tuning key (head dims and dtypes)
    tuned = {name: {str(key): str(cfg) for key, cfg in getattr(fn, "cache", {}).items()}
             for name, fn in (("segment_output", lt._segment_output), ("segment_state", lt._segment_state))}
    return dict(rows=rows, tuned_configs=tuned, summary=_summary(rows))


def _summary(rows):
    ours = [r for r in rows if r.get("kernel") == "seqpar" and r.get("layout") == "dense" and "error" not in r]
    if not ours:
        return {}
    rates = [r["fwdbwd_Mtok_s"] for r in ours]
    return dict(goal_fwdbwd_Mtok_s=11.0, min_fwdbwd_Mtok_s=min(rates), max_fwdbwd_Mtok_s=max(rates),
                flatness_min_over_max=round(min(rates) / max(max(rates), 1e-9), 3))


def _table(rows):
    lines = [f"{'kernel':34} {'layout':7} {'B':>3} {'S':>7} {'docs':>5} {'fwd Mtok/s':>11} {'fwd+bwd Mtok/s':>15}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:34} {r['layout']:7} {r['B']:>3} {r['S']:>7}  error: {r['error'][:60]}")
        else:
            lines.append(f"{r['kernel']:34} {r['layout']:7} {r['B']:>3} {r['S']:>7} {r['n_docs']:>5} "
                         f"{r['fwd_Mtok_s']:>11} {r['fwdbwd_Mtok_s']:>15}")
    return "\n".join(lines)


def bench_flash(args, device):
    from seqpar.bench._flash_cases import bench_flash as run  # softmax attention: its own module
    return run(args, device)


def bench_fused(args, device):
    from seqpar.bench._fused_cases import bench_fused as run  # RMSNorm, RoPE, linear + CE: its own module
    return run(args, device)


SECTIONS = {"lightning": bench_lightning, "flash": bench_flash, "fused": bench_fused}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m seqpar.bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None, help="dense sequence lengths")
    p.add_argument("--packed-lens", type=int, nargs="*", default=None, help="packed row lengths (lognormal docs)")
    p.add_argument("--tokens", type=int, default=TOKENS, help="B*S of the dense cases (B = max(1, tokens // S))")
    p.add_argument("--reference-max-tokens", type=int, default=TOKENS)
    p.add_argument("--heads", type=int, default=H)
    p.add_argument("--head-dim", type=int, default=D)
    p.add_argument("--seg-lens", type=int, nargs="*", default=[],
                   help="lightning: also time these segment lengths (multiples of 64) beside the heuristic's")
    p.add_argument("--fused-parts", nargs="+", default=None, choices=("rms_norm", "rope", "ce"),
                   help="fused: which parts to run (default all)")
    p.add_argument("--rms-bwd-variants", nargs="*", default=[],
                   help="fused: RMSNorm backward loop variants (norm_rope.triton.RMS_BWD_VARIANTS) beside the default")
    p.add_argument("--flash-dense-lens", type=int, nargs="*", default=None, help="flash: dense causal lengths")
    p.add_argument("--flash-packed-lens", type=int, nargs="*", default=None, help="flash: packed row lengths")
    p.add_argument("--flash-no-ring-step", action="store_true", help="flash: skip the one-ring-step rows")
    p.add_argument("--flash-mix", default="lognormal",
                   help="flash: document lengths of the packed rows: lognormal (the anchor's) or a mix of "
                        "bench disagg (wlbllm, prolong)")
    p.add_argument("--flash-warm", type=int, nargs=2, default=None, metavar=("PART", "PARTS"),
                   help="flash: only compile this share of the kernels the Triton tuners try")
    p.add_argument("--flash-profile", type=int, nargs="*", default=[],
                   help="flash: at these lengths, the Triton row also lists its kernels' GPU ms (torch.profiler)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.seq_lens is None:
        args.seq_lens = [4096, 16384, 65536, 262144] if device.type == "cuda" else [256]
    if args.packed_lens is None:
        args.packed_lens = [65536, 262144] if device.type == "cuda" else []
    if device.type != "cuda":
        args.tokens = min(args.tokens, 512)
    import triton
    result = dict(bench="kernels", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                  torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                  cuda=torch.version.cuda)
    for name in args.only.split(","):
        if name not in SECTIONS:
            raise SystemExit(f"--only: unknown section {name!r}; known: {', '.join(SECTIONS)}")
        result[name] = SECTIONS[name](args, device)
        print(result[name].pop("table", None) or _table(result[name]["rows"]), flush=True)
        print(json.dumps(result[name]["summary"]), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0
