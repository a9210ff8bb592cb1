"""The `fused` section of `python -m seqpar.bench kernels`: RMSNorm, RoPE, fused linear + CE.

RMSNorm and RoPE are memory-bound, so they are reported in GB/s of the bytes the op must move
(x in and y out for the forward; x, dy in and dx out for RMSNorm's backward; dy in and dx out plus
the cos/sin tables for RoPE's) next to a plain device-to-device copy of 1 GiB measured in the same
run (the HBM anchor, read + write bytes), and next to torch's `F.rms_norm` and the unfused torch
RoPE (`apply_rotary_reference`). The goal is >= 80% of the copy's GB/s.

Cross-entropy at 64k tokens x 128k vocabulary (hidden 2048, bf16): forward+backward time and
peak memory (`torch.cuda.max_memory_allocated` after a reset, inputs included) of seqpar's Triton
chunked kernel, the chunked torch reference, and the unfused `F.cross_entropy(F.linear(h, w))`.
The goal: peak <= 1/8 of the unfused one at <= 1.1x its time.

Off CUDA it runs a smoke form on tiny shapes (the Triton kernels when TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from seqpar.bench.kernels import _timer

GB = 1e9
GiB = 2 ** 30
FUSED_PARTS = ("rms_norm", "rope", "ce")


def _use_triton(device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _copy_anchor(device, timer, nbytes):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return dict(kernel="copy (HBM anchor)", op="copy", case=f"{nbytes / GiB:g} GiB", fwd_ms=round(ms, 4),
                fwd_GBps=round(2 * nbytes / ms / 1e6, 1))


def _rate(row, bytes_fwd, bytes_bwd, copy_gbps):
    row["fwd_GBps"] = round(bytes_fwd / row["fwd_ms"] / 1e6, 1)
    row["bwd_GBps"] = round(bytes_bwd / row["bwd_ms"] / 1e6, 1)
    if copy_gbps:
        row["fwd_pct_copy"] = round(100 * row["fwd_GBps"] / copy_gbps, 1)
        row["bwd_pct_copy"] = round(100 * row["bwd_GBps"] / copy_gbps, 1)
    return row


def _graphed(fn, device):
    """fn replayed from a CUDA graph: the GPU's time without the host's between kernels. A lone
    autograd backward takes ~0.1-0.15 ms of host time, more than RoPE's kernel at 8 heads (H100,
    2026-11-27: 64.6% of the copy's bandwidth even with 8 calls queued, 97.5% forward). Eager fn
    where a graph cannot hold it (or on CPU)."""
    if device.type != "cuda":
        return fn
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # tuning, compilation and the allocator's warm-up outside the capture
            fn(), fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    except Exception:  # noqa: BLE001 - a kernel the graph cannot capture is timed eagerly
        torch.cuda.synchronize()
        return fn


def _fwd_bwd_ms(timer, fn, inputs, dy):
    """(forward ms, backward-only ms) of fn(*inputs), the backward from one retained graph, each
    timed as GPU time (`_graphed`)."""
    leaves = [t for t in inputs if t.requires_grad]
    device = inputs[0].device
    fwd = timer(_graphed(lambda: fn(*inputs), device))
    y = fn(*inputs)
    bwd = timer(_graphed(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), device))
    return fwd, bwd, y.detach()


def _rel(a, b):
    a, b = a.double(), b.double()
    return round(((a - b).norm() / b.norm().clamp_min(1e-30)).item(), 6)


def _norm_rows(device, timer, tokens, widths, copy_gbps, bwd_variants=()):
    """`bwd_variants`: backward loop variants (norm_rope.triton.RMS_BWD_VARIANTS) timed beside the
    default, as rows "seqpar triton bwd=NAME" (candidates for RMS_BWD_DEFAULT)."""
    from seqpar.kernels.norm_rope.reference import rms_norm_reference
    impls = {"torch F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
             "torch reference (unfused)": lambda x, w: rms_norm_reference(x, w, 1e-6)}
    if _use_triton(device):
        from seqpar.kernels.norm_rope.triton import rms_norm_triton
        variants = {f"seqpar triton bwd={v}": (lambda x, w, v=v: rms_norm_triton(x, w, 1e-6, bwd_variant=v))
                    for v in bwd_variants}
        impls = {"seqpar triton": lambda x, w: rms_norm_triton(x, w, 1e-6), **variants, **impls}
    rows = []
    for N in widths:
        g = torch.Generator(device=device).manual_seed(N)
        x = torch.randn(tokens, N, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
        w = (1 + 0.1 * torch.randn(N, device=device, generator=g)).bfloat16().requires_grad_()
        dy = torch.randn(x.shape, device=device, generator=g, dtype=x.dtype)
        elt = x.element_size()
        outs = {}
        for name, fn in impls.items():
            fwd, bwd, outs[name] = _fwd_bwd_ms(timer, fn, (x, w), dy)
            row = dict(kernel=name, op="rms_norm", case=f"{tokens}x{N} bf16", fwd_ms=round(fwd, 4),
                       bwd_ms=round(bwd, 4))
            rows.append(_rate(row, 2 * tokens * N * elt, 3 * tokens * N * elt, copy_gbps))
            if name != next(iter(impls)):
                row["rel_err_vs_first"] = _rel(outs[next(iter(impls))], outs[name])
            if name.startswith("seqpar triton bwd="):  # the backward is what differs: compare its grads
                row["grad_rel_err_vs_first"] = _grad_rel(impls[next(iter(impls))], impls[name], x, w, dy)
            print(row, flush=True)
        del x, w, dy, outs
    return rows


def _grad_rel(first, other, x, w, dy):
    """max over (dx, dw) of the relative difference of other's gradients to first's."""
    a = torch.autograd.grad(first(x, w), (x, w), dy)
    b = torch.autograd.grad(other(x, w), (x, w), dy)
    return max(_rel(gb, ga) for ga, gb in zip(a, b))


def _rope_rows(device, timer, tokens, heads_list, head_dim, copy_gbps):
    from seqpar.kernels.norm_rope.reference import apply_rotary_reference, rotary_cos_sin
    impls = {"torch reference (unfused)": apply_rotary_reference}
    if _use_triton(device):
        from seqpar.kernels.norm_rope.triton import apply_rotary_triton
        impls = {"seqpar triton": apply_rotary_triton, **impls}
    cos, sin = rotary_cos_sin(torch.arange(tokens, device=device), head_dim, 500000.0)
    table_bytes = 2 * cos.numel() * cos.element_size()
    rows = []
    for H in heads_list:
        g = torch.Generator(device=device).manual_seed(H)
        x = torch.randn(1, tokens, H, head_dim, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
        dy = torch.randn(x.shape, device=device, generator=g, dtype=x.dtype)
        nbytes = 2 * x.numel() * x.element_size() + table_bytes
        outs = {}
        for name, fn in impls.items():
            fwd, bwd, outs[name] = _fwd_bwd_ms(timer, lambda t: fn(t, cos, sin), (x,), dy)
            row = dict(kernel=name, op="rope", case=f"1x{tokens}x{H}x{head_dim} bf16", fwd_ms=round(fwd, 4),
                       bwd_ms=round(bwd, 4))
            rows.append(_rate(row, nbytes, nbytes, copy_gbps))
            if name != next(iter(impls)):
                row["rel_err_vs_first"] = _rel(outs[next(iter(impls))], outs[name])
            print(row, flush=True)
        del x, dy, outs
    return rows


def _peak(device, fn, leaves):
    """Peak bytes allocated during one fn() (inputs included) and the bytes held before it."""
    if device.type != "cuda":
        fn()
        return None, None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    for t in leaves:
        t.grad = None
    return peak, before


def _ce_rows(device, N, V, d, chunks):
    from seqpar.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
    timer = _timer(device, warmup=100, rep=1500)  # ~0.2 s per call at full size: a handful of timed runs
    impls = {}
    if _use_triton(device):
        from seqpar.kernels.cross_entropy.triton import fused_linear_cross_entropy_triton
        for c in chunks:
            impls[f"seqpar triton (chunk {c})"] = (
                lambda h, w, t, c=c: fused_linear_cross_entropy_triton(h, w, t, chunk_size=c))
    impls[f"torch chunked reference (chunk {chunks[0]})"] = (
        lambda h, w, t: fused_linear_cross_entropy_reference(h, w, t, chunk_size=chunks[0]))
    impls["unfused F.linear + F.cross_entropy"] = lambda h, w, t: F.cross_entropy(F.linear(h, w), t, reduction="sum")
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, d, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, d, device=device, generator=g) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device=device, generator=g)
    t[::97] = -100
    rows, losses = [], {}
    for name, fn in impls.items():
        row = dict(kernel=name, op="linear+cross_entropy", case=f"N={N} V={V} d={d} bf16")
        try:
            def step():
                loss = fn(h, w, t)
                loss.backward()
                losses[name] = loss.detach().float()
            peak, before = _peak(device, step, [h, w])
            ms = timer(step, [h, w])
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e)[:200]}"
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
            continue
        row.update(fwdbwd_ms=round(ms, 3))
        if peak is not None:
            row.update(peak_GiB=round(peak / GiB, 3), peak_over_inputs_GiB=round((peak - before) / GiB, 3))
        rows.append(row)
        print(row, flush=True)
    ref = losses.get("unfused F.linear + F.cross_entropy")
    for row in rows:
        if ref is not None and row["kernel"] in losses:
            row["loss_rel_diff_vs_unfused"] = round(abs((losses[row["kernel"]] - ref) / ref).item(), 7)
    return rows


def _summary(rows, copy_gbps):
    out = dict(copy_GBps=copy_gbps)
    for op in ("rms_norm", "rope"):
        ours = [r for r in rows if r["op"] == op and r["kernel"] == "seqpar triton"]
        if ours and copy_gbps:
            out[f"{op}_min_pct_copy"] = min(min(r["fwd_pct_copy"], r["bwd_pct_copy"]) for r in ours)
    # each backward candidate's worst width, beside the default's: the pick for RMS_BWD_DEFAULT
    cands = sorted({r["kernel"] for r in rows if r["op"] == "rms_norm" and r["kernel"].startswith("seqpar triton")})
    if copy_gbps and len(cands) > 1:
        out["rms_norm_bwd_min_pct_copy"] = {
            k: min(r["bwd_pct_copy"] for r in rows if r["op"] == "rms_norm" and r["kernel"] == k) for k in cands}
    ce = {r["kernel"]: r for r in rows if r["op"] == "linear+cross_entropy"}
    unfused = ce.get("unfused F.linear + F.cross_entropy")
    if unfused is not None and "error" in unfused:
        out["ce_unfused"] = unfused["error"]
    elif unfused is not None and "peak_GiB" in unfused:
        # the goal: peak <= 1/8 of the unfused one at <= 1.1x its time
        out["ce_vs_unfused"] = {k: dict(time_ratio=round(r["fwdbwd_ms"] / unfused["fwdbwd_ms"], 3),
                                        peak_fraction=round(r["peak_GiB"] / unfused["peak_GiB"], 4),
                                        goal_met=r["fwdbwd_ms"] <= 1.1 * unfused["fwdbwd_ms"]
                                        and r["peak_GiB"] <= unfused["peak_GiB"] / 8)
                                for k, r in ce.items() if r is not unfused and "error" not in r}
    return out


def _table(rows):
    head = f"{'op':21} {'kernel':38} {'case':26} {'fwd ms':>9} {'bwd ms':>9} {'fwd GB/s':>9} {'bwd GB/s':>9} " \
           f"{'%copy f/b':>11} {'fwd+bwd ms':>10} {'peak GiB':>9}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:21} {r['kernel']:38} {r['case']:26} error: {r['error'][:60]}")
            continue
        pct = f"{r['fwd_pct_copy']}/{r['bwd_pct_copy']}" if "fwd_pct_copy" in r else ""
        lines.append(f"{r['op']:21} {r['kernel']:38} {r['case']:26} {r.get('fwd_ms', ''):>9} {r.get('bwd_ms', ''):>9} "
                     f"{r.get('fwd_GBps', ''):>9} {r.get('bwd_GBps', ''):>9} {pct:>11} {r.get('fwdbwd_ms', ''):>10} "
                     f"{r.get('peak_GiB', ''):>9}")
    return "\n".join(lines)


def bench_fused(args, device):
    cuda = device.type == "cuda"
    timer = _timer(device)
    rows = [_copy_anchor(device, timer, GiB if cuda else 2 ** 20)]
    copy_gbps = rows[0]["fwd_GBps"]
    print(rows[0], flush=True)
    tokens = 65536 if cuda else 256
    parts = getattr(args, "fused_parts", None) or FUSED_PARTS
    if "rms_norm" in parts:
        rows += _norm_rows(device, timer, tokens, [2048, 4096, 8192] if cuda else [64, 100], copy_gbps,
                           getattr(args, "rms_bwd_variants", ()) or ())
    if "rope" in parts:
        rows += _rope_rows(device, timer, tokens, [32, 8] if cuda else [4], 128 if cuda else 32, copy_gbps)
    if "ce" in parts:
        if cuda:
            rows += _ce_rows(device, 65536, 131072, 2048, chunks=[4096, 8192])
        else:
            rows += _ce_rows(device, 256, 1024, 64, chunks=[64])
    return dict(rows=rows, summary=_summary(rows, copy_gbps), tuned_configs=_tuned(), table=_table(rows))


def _tuned():
    """What the autotuner picked per key (width, dtypes): the configs to pin if tuning ever costs."""
    try:
        from seqpar.kernels.norm_rope import triton as nr
    except ImportError:
        return {}
    return {name: {str(key): str(cfg) for key, cfg in getattr(fn, "cache", {}).items()}
            for name, fn in (("rms_norm_fwd", nr._rms_norm_fwd), ("rms_norm_bwd", nr._rms_norm_bwd),
                             ("rotary", nr._rotary))}
