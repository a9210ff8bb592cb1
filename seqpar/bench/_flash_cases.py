"""The `flash` section of `python -m seqpar.bench kernels` (`--only flash`).

Softmax attention, bf16, H=32, D=128, one row (B = 1), shapes of ../shared/anchors/anchors_gpu.py
and anchors_varlen.py:

- dense causal at S = 16k and 64k: seqpar's Triton kernel beside SDPA cuDNN, SDPA flash and
  FlexAttention (compiled, causal block mask); FLOPs 2 S^2 H D forward, 3.5x that fwd+bwd;
- packed documents of the anchor's lognormal lengths (16k, 64k): the Triton kernel beside
  FlexAttention with a causal document mask and torch's varlen flash (today's dispatch choice),
  TFLOP/s over the useful work sum(2 l^2 H D) only; beside them the split (kernels/flash_attn/split.py:
  documents of >= 4096 tokens through cuDNN, the rest through one Triton call; `seqpar_split`, and
  `seqpar_split_min2048` with a lower threshold) with its max abs difference from the Triton row
  in out and gradients;
- one ring step at 16k (a non-causal block merged into a running fp32 (out, lse)): the Triton
  kernel's in-place merge beside the lse path of the dispatcher plus the torch merge.

Each row says which kernel the dispatcher gives that case (`flash_attn_choice`), and the Triton
rows carry their relative error against cuDNN (dense) or FlexAttention (packed) on the same inputs
and the autotuners' picks; `--flash-profile S` adds the Triton row's kernel times at length S
(`kernels_ms`).
"""
from __future__ import annotations

import time

import torch

H, D = 32, 128
DENSE_LENS = (16384, 65536)
PACKED_LENS = (16384, 65536)
GOAL_DENSE_FWDBWD = 400.0
GOAL_PACKED_VS_FLEX = 1.3
# split rows: documents of at least this many tokens through cuDNN (None: the default, SEQPAR_CUDNN_DOC_MIN)
SPLIT_ROWS = {"seqpar_split": None, "seqpar_split_min2048": 2048}


def _bench(device):
    if device.type == "cuda":
        from triton.testing import do_bench
        return lambda fn, grads=None: do_bench(fn, warmup=50, rep=300, return_mode="median", grad_to_none=grads)

    def wall(fn, grads=None):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return wall


def mix_lengths(mix: str, S: int) -> list[int]:
    """One row of S tokens packed from a document-length mix of `bench disagg` (seeded by S)."""
    import random

    from seqpar.bench.disagg import draw_bounds, load_mix
    bounds = draw_bounds(mix, load_mix(mix), S, 1, random.Random(S), S)
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _rel(a, b):
    a, b = a.double(), b.double()
    return round(((a - b).norm() / b.norm()).item(), 5)


def _impls(S, lens, device):
    """{name: fn(q, k, v) -> out} on [1, S, H, D] tensors (transposed views where a kernel wants [B, H, S, D])."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seqpar.kernels.flash_attn.triton import flash_attn_triton

    cu = None if lens is None else _cu(lens, device)
    impls = {"seqpar_triton": lambda q, k, v: flash_attn_triton(q, k, v, causal=True, cu_seqlens=cu)}
    from seqpar.kernels.flash_attn import cudnn_graph
    if cudnn_graph.available():  # a whole row in one cuDNN call (nvidia-cudnn-frontend)
        impls["cudnn_graph"] = lambda q, k, v: cudnn_graph.GraphAttn.apply(q, k, v, True, cu, cu, None)[0]
    if lens is not None:
        from seqpar.kernels.flash_attn.split import flash_attn_split
        for name, min_len in SPLIT_ROWS.items():
            impls[name] = lambda q, k, v, m=min_len: flash_attn_split(q, k, v, causal=True, cu_seqlens=cu, min_len=m)
    if lens is None:
        for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def sdpa(q, k, v, be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                                          is_causal=True).transpose(1, 2)
            impls[name] = sdpa
    else:
        from seqpar.kernels import dispatch
        if dispatch.has_varlen_attn():
            from seqpar.kernels.flash_attn.sdpa import varlen_attention
            impls["torch_varlen_flash"] = lambda q, k, v: varlen_attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return impls
    flex = torch.compile(flex_attention)
    if lens is None:
        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device=device)
        name = "flex_causal"
    else:
        doc = torch.repeat_interleave(torch.arange(len(lens), device=device), torch.tensor(lens, device=device))
        mask = create_block_mask(lambda b, h, qi, ki: (qi >= ki) & (doc[qi] == doc[ki]), None, None, S, S,
                                 device=device)
        name = "flex_docmask"
    impls[name] = lambda q, k, v: flex(*(t.transpose(1, 2) for t in (q, k, v)), block_mask=mask).transpose(1, 2)
    return impls


def _kernel_ms(fn, q, k, v, do, reps=3):
    """GPU ms per fwd+bwd of each kernel (torch.profiler), largest first: where the time goes."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn(q, k, v).backward(do)
        torch.cuda.synchronize()
    per = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            per[e.key[:60]] = round(t / reps / 1e3, 3)
    return dict(sorted(per.items(), key=lambda kv: -kv[1])[:8])


def case_inputs(S, lens, device, heads=H, kv_heads=None, head_dim=D):
    """(q, k, v, dout, useful forward FLOPs, cu_seqlens) of a case: bf16 [1, S, heads, head_dim]
    (k, v with kv_heads), seeded by S, q, k, v requiring grad; lens None: one dense causal row."""
    gen = torch.Generator(device=device).manual_seed(S)
    q, k, v, do = (torch.randn(1, S, n, head_dim, device=device, dtype=torch.bfloat16, generator=gen)
                   for n in (heads, kv_heads or heads, kv_heads or heads, heads))
    for t in (q, k, v):
        t.requires_grad_()
    useful = 2 * heads * head_dim * (S * S if lens is None else sum(n * n for n in lens))
    return q, k, v, do, useful, (None if lens is None else _cu(lens, device))


def _case_rows(layout, S, lens, device, timer, profile=False, heads=H):
    from seqpar.kernels import dispatch

    q, k, v, do, useful, cu = case_inputs(S, lens, device, heads)
    choice = dispatch.flash_attn_choice(q, k, v, causal=True, cu_seqlens=cu) if device.type == "cuda" else None
    rows, outs, grads = [], {}, {}
    for name, fn in _impls(S, lens, device).items():
        try:
            outs[name] = fn(q, k, v).detach()
            if lens is not None and name.startswith("seqpar_"):  # the split rows' check against Triton's
                grads[name] = torch.autograd.grad(fn(q, k, v), (q, k, v), do)
            ms_f = timer(lambda: fn(q, k, v))
            ms_fb = timer(lambda: fn(q, k, v).backward(do), [q, k, v])
        except Exception as e:  # a kernel that cannot run a case is recorded, not fatal
            rows.append(dict(kernel=name, layout=layout, S=S, error=repr(e)[:300]))
            print(rows[-1], flush=True)
            continue
        row = dict(kernel=name, layout=layout, S=S, H=heads, D=D, dtype="bfloat16",
                   n_docs=1 if lens is None else len(lens), max_doc=S if lens is None else max(lens),
                   fwd_ms=round(ms_f, 3), fwdbwd_ms=round(ms_fb, 3),
                   fwd_tflops=round(useful / ms_f / 1e9, 1), fwdbwd_tflops=round(3.5 * useful / ms_fb / 1e9, 1))
        if name == "seqpar_triton":
            row.update(dispatch_default=choice, tuned=_tuned(compact=True))
            if profile:
                try:
                    row["kernels_ms"] = _kernel_ms(fn, q, k, v, do)
                except Exception as e:  # a diagnostic: never costs the row
                    row["kernels_ms"] = {"error": repr(e)[:200]}
        rows.append(row)
        print(row, flush=True)
    anchor = "sdpa_cudnn" if lens is None else "flex_docmask"
    for row in rows:
        if row["kernel"] == "seqpar_triton" and "error" not in row and anchor in outs:
            row[f"rel_err_vs_{anchor}"] = _rel(outs["seqpar_triton"], outs[anchor])
        if row["kernel"] in SPLIT_ROWS and "error" not in row and "seqpar_triton" in grads:
            mine = (outs[row["kernel"]], *grads[row["kernel"]])
            theirs = (outs["seqpar_triton"], *grads["seqpar_triton"])
            row["max_abs_diff_vs_triton"] = {n: round((a.float() - b.float()).abs().max().item(), 5)
                                             for n, a, b in zip(("out", "dq", "dk", "dv"), mine, theirs)}
            row["rel_err_vs_triton"] = {n: _rel(a, b) for n, a, b in zip(("out", "dq", "dk", "dv"), mine, theirs)}
            print({"kernel": row["kernel"], "S": S, "vs_triton": row["max_abs_diff_vs_triton"]}, flush=True)
    return rows


def _ring_step_rows(S, device, timer):
    """One ring step: a non-causal [S x S] block folded into a running fp32 (out, lse)."""
    from seqpar.attention.ring import _merge
    from seqpar.kernels.flash_attn.aten import attention_with_lse
    from seqpar.kernels.flash_attn.triton import flash_attn_merge_

    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(1, S, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out0 = torch.randn(1, S, H, D, device=device)
    lse0 = torch.randn(1, H, S, device=device) + 5.0
    flops = 4 * S * S * H * D

    def ours():
        flash_attn_merge_(q, k, v, out0.clone(), lse0.clone(), causal=False)

    def cudnn_then_merge():
        o, l = attention_with_lse(q, k, v, kernel="cudnn", causal=False)
        _merge(out0.clone(), lse0.clone(), o, l)

    rows = []
    base = timer(lambda: (out0.clone(), lse0.clone()))  # the clones both sides pay
    for name, fn in (("seqpar_triton_merge_", ours), ("aten_cudnn_lse+torch_merge", cudnn_then_merge)):
        try:
            ms = max(timer(fn) - base, 1e-6)
        except Exception as e:
            rows.append(dict(kernel=name, layout="ring_step", S=S, error=repr(e)[:300]))
            continue
        rows.append(dict(kernel=name, layout="ring_step", S=S, H=H, D=D, fwd_ms=round(ms, 3),
                         fwd_tflops=round(flops / ms / 1e9, 1)))
        print(rows[-1], flush=True)
    return rows


def _tuned(compact=False):
    """What the autotuners picked per key (compact: the distinct picks only)."""
    from seqpar.kernels.flash_attn import triton as ft
    kernels = (("fwd", ft._attn_fwd), ("bwd_dkdv", ft._attn_bwd_dkdv), ("bwd_dq", ft._attn_bwd_dq))
    if compact:
        return {name: sorted({str(cfg).split(", num_ctas")[0] for cfg in getattr(fn, "cache", {}).values()})
                for name, fn in kernels}
    return {name: {str(key): str(cfg) for key, cfg in getattr(fn, "cache", {}).items()} for name, fn in kernels}


def _summary(rows):
    def rate(kernel, layout, S):
        hit = [r for r in rows if r["kernel"] == kernel and r["layout"] == layout and r["S"] == S and "error" not in r]
        return hit[0]["fwdbwd_tflops"] if hit else None

    out = dict(goal_dense_fwdbwd_tflops=GOAL_DENSE_FWDBWD, goal_packed_vs_flex=GOAL_PACKED_VS_FLEX)
    for S in DENSE_LENS:
        out[f"dense_{S}_fwdbwd_tflops"] = {k: rate(k, "dense", S) for k in ("seqpar_triton", "sdpa_cudnn",
                                                                             "sdpa_flash", "flex_causal")}
    for S in PACKED_LENS:
        ours, flex = rate("seqpar_triton", "packed", S), rate("flex_docmask", "packed", S)
        out[f"packed_{S}_fwdbwd_vs_flex"] = round(ours / flex, 3) if ours and flex else None
        for name in SPLIT_ROWS:
            split = rate(name, "packed", S)
            out[f"packed_{S}_{name}_fwdbwd_vs_flex"] = round(split / flex, 3) if split and flex else None
    out["suggest_TRITON_FASTER"] = _suggest(rows, rate)
    # the split at its default threshold beat both packed kernels at every measured length
    pairs = [(rate("seqpar_split", "packed", S), rate("seqpar_triton", "packed", S),
              rate("torch_varlen_flash", "packed", S) or 0.0) for S in PACKED_LENS]
    out["suggest_SPLIT_FASTER"] = ["packed"] if all(a and b and a > max(b, c) for a, b, c in pairs) else []
    return out


def _suggest(rows, rate):
    """The dispatch cases (kernels.dispatch.attention_case) where Triton beat today's default at
    every measured length: what kernels/dispatch.py's TRITON_FASTER should hold on this GPU."""
    def beats(other, layout, lens):
        pairs = [(rate("seqpar_triton", layout, S), rate(other, layout, S)) for S in lens]
        return all(a and b and a > b for a, b in pairs)

    step = {r["kernel"]: r.get("fwd_tflops") for r in rows if r["layout"] == "ring_step" and "error" not in r}
    step_wins = (step.get("seqpar_triton_merge_") or 0) > (step.get("aten_cudnn_lse+torch_merge") or float("inf"))
    cases = []
    if beats("sdpa_cudnn", "dense", DENSE_LENS):
        cases.append("dense")
        if step_wins:
            cases.append("dense_lse")
    if beats("torch_varlen_flash", "packed", PACKED_LENS):
        cases += ["packed", "packed_lse"]
    return cases


def table(rows):
    lines = [f"{'kernel':28} {'layout':9} {'S':>6} {'docs':>5} {'fwd TFLOP/s':>12} {'fwd+bwd TFLOP/s':>16}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['kernel']:28} {r['layout']:9} {r['S']:>6}  error: {r['error'][:60]}")
        else:
            lines.append(f"{r['kernel']:28} {r['layout']:9} {r['S']:>6} {r.get('n_docs', 1):>5} "
                         f"{r['fwd_tflops']:>12} {r.get('fwdbwd_tflops', '-'):>16}")
    return "\n".join(lines)


def warm_compile(part, parts, device):
    """Compile every kernel config that the tuners try on the benchmark's shapes, this process's
    share (`part` of `parts`), by one small fwd+bwd per combination of single configs. Run in
    parallel processes before the benchmark: its tuning then finds the kernels in Triton's cache
    instead of compiling some 20 of them one after another. Small shapes compile the same variants
    (H, D, dtypes, the strides' divisibility; lengths are not specialised)."""
    from seqpar.kernels.flash_attn import triton as ft

    jobs = []
    q_block, k_block = ft.table_blocks(D)
    for varlen in (False, True):
        fwd = [o for o in ft._FWD_OPTIONS if not varlen or o[0] == q_block]  # packed: the table's blocks only
        dq = [o for o in ft._DQ_OPTIONS if not varlen or o[0] == q_block]
        dkdv = [o for o in ft._DKDV_OPTIONS if not varlen or o[0] == k_block]
        jobs += [(varlen, (fwd[i % len(fwd)], dq[i % len(dq)], dkdv[i % len(dkdv)]))
                 for i in range(max(len(fwd), len(dq), len(dkdv)))]
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(1, 1024, H, D, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    cu = _cu([300, 724], device)
    mine, failed = jobs[part::parts], []
    for varlen, (fwd, dq, dkdv) in mine:
        # one config each: the autotuner then compiles and runs it, no tuning
        ft._attn_fwd.configs = ft._configs("BLOCK_M", "BLOCK_N", [fwd])
        ft._attn_bwd_dq.configs = ft._configs("BLOCK_M", "BLOCK_N", [dq])
        ft._attn_bwd_dkdv.configs = ft._configs("BLOCK_N", "BLOCK_M", [dkdv], extra=("SPLIT",))
        try:
            ft.flash_attn_triton(q, k, v, causal=True, cu_seqlens=cu if varlen else None).backward(do)
        except Exception as e:  # the benchmark's tuner meets (and skips) the same failure
            failed.append(f"varlen={varlen} {fwd} {dq} {dkdv}: {repr(e)[:200]}")
    torch.cuda.synchronize()
    return dict(rows=[], summary=dict(warmed=len(mine), of=len(jobs), failed=failed), table="")


def bench_flash(args, device):
    """Rows, the autotuner's picks and a summary against the issue's goals."""
    from seqpar.bench.ring import lognormal_lengths

    if device.type != "cuda":  # the interpreter runs of the kernel are tests (tests/test_flash_triton.py)
        return dict(rows=[], summary=dict(skipped="the flash section needs a CUDA device"), table="")
    if getattr(args, "flash_warm", None):
        part, parts = args.flash_warm
        return warm_compile(part, parts, device)
    timer = _bench(device)
    rows = []
    dense = getattr(args, "flash_dense_lens", None)
    packed = getattr(args, "flash_packed_lens", None)
    prof = set(getattr(args, "flash_profile", None) or ())
    heads = getattr(args, "heads", H)  # fewer: one tensor-parallel rank's share of a layer's heads
    mix = getattr(args, "flash_mix", "lognormal")
    for S in DENSE_LENS if dense is None else dense:
        rows += _case_rows("dense", S, None, device, timer, S in prof, heads)
    for S in PACKED_LENS if packed is None else packed:
        lens = lognormal_lengths(S) if mix == "lognormal" else mix_lengths(mix, S)
        rows += [dict(row, mix=mix) for row in _case_rows("packed", S, lens, device, timer, S in prof, heads)]
    if not getattr(args, "flash_no_ring_step", False):
        rows += _ring_step_rows(DENSE_LENS[0], device, timer)
    return dict(rows=rows, tuned_configs=_tuned(), summary=_summary(rows), table=table(rows))
