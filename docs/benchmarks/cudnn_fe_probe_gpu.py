"""Can cuDNN itself run what seqpar sends to its Triton kernel? A probe of the cuDNN frontend's
Python graphs (nvidia-cudnn-frontend, a wheel carried to the device), one H100 (~2 min):

    pip install --target /tmp/cfe nvidia_cudnn_frontend-*.whl; PYTHONPATH=/tmp/cfe \
        python3 docs/benchmarks/cudnn_fe_probe_gpu.py OUT.json

torch's cuDNN attention aligns a causal mask top-left and runs one dense shape per call, so the
disagg servers' pieces over a prefix (queries shorter than keys, causal bottom-right) and the
split's short documents run on seqpar's Triton kernel, whose backward costs 1.5-1.9 cuDNN score
pairs (2026-11-28 call 2). cuDNN's graph API has a bottom-right causal mask and packed (ragged,
THD) rows with per-document lengths. Checked here, each step reported and none fatal:
1. bf16 forward (out, lse) and backward against float64 (seqpar's reference): a piece over a
   prefix (GQA 8/2, D = 64) and a packed row of awkward lengths (MHA 8, D = 128);
2. timing, forward and backward separately (CUDA events, median of 10), next to seqpar's Triton
   kernel in the same process: pieces 8k over 56k and 2k over 30k at llama_1b's heads (32/8 x 64),
   and a packed lognormal 16k row at 32 x 128 (issue 5's 1.3x FlexAttention case; the split ran it
   at 9.72 ms fwd+bwd, Flex at 11.1, 2026-11-28 call 3).
"""
import json
import sys
import traceback

import torch

from piece_kernels_gpu import _ms  # noqa: E402 (the script beside this one: python puts its folder on the path)

rows = []


def log(**kw):
    rows.append(kw)
    print(json.dumps(kw), flush=True)


def _bshd_stride(s, h, d):
    return [s * h * d, d, h * d, 1]  # cuDNN dims are [B, H, S, D]; seqpar's memory is [B, S, H, D]


class Attn:
    """A forward and a backward cuDNN graph of one geometry: dense [1, S, H, D] rows (`lens` None)
    or one packed row of documents (`lens`, THD with ragged offsets, per-document lengths)."""

    def __init__(self, cudnn, handle, hq, hkv, d, sq, sk, bottom_right, lens=None, scale=None):
        self.cudnn, self.handle, self.lens = cudnn, handle, lens
        bf16, f32, i32 = cudnn.data_type.BFLOAT16, cudnn.data_type.FLOAT, cudnn.data_type.INT32
        b = 1 if lens is None else len(lens)
        smax_q, smax_k = (sq, sk) if lens is None else (max(lens), max(lens))
        self.scale = scale or d ** -0.5
        self.dims = (b, hq, hkv, d, smax_q, smax_k)
        mask = dict(use_causal_mask_bottom_right=True) if bottom_right else dict(use_causal_mask=True)

        def graph():
            return cudnn.pygraph(io_data_type=bf16, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

        def io(g, name, h, s, ragged):
            return g.tensor(name=name, dim=[b, h, s, d], stride=_bshd_stride(s, h, d), data_type=bf16,
                            ragged_offset=ragged)

        def extras(g):
            if lens is None:
                return {}, None, None
            ro_q = g.tensor(name="ro_q", dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
            ro_k = g.tensor(name="ro_k", dim=[b + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
            sl_q = g.tensor(name="sl_q", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
            sl_k = g.tensor(name="sl_k", dim=[b, 1, 1, 1], stride=[1, 1, 1, 1], data_type=i32)
            return dict(use_padding_mask=True, seq_len_q=sl_q, seq_len_kv=sl_k), ro_q, ro_k

        g = graph()
        kw, ro_q, ro_k = extras(g)
        q, k, v = io(g, "q", hq, smax_q, ro_q), io(g, "k", hkv, smax_k, ro_k), io(g, "v", hkv, smax_k, ro_k)
        try:
            o, stats = g.sdpa(q, k, v, name="sdpa", generate_stats=True, attn_scale=self.scale, **mask, **kw)
        except TypeError:  # older spelling
            o, stats = g.sdpa(q, k, v, name="sdpa", is_inference=False, attn_scale=self.scale, **mask, **kw)
        o.set_output(True).set_dim([b, hq, smax_q, d]).set_stride(_bshd_stride(smax_q, hq, d))
        if ro_q is not None:
            o.set_ragged_offset(ro_q)
        stats.set_output(True).set_data_type(f32)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.fwd = (g, dict(q=q, k=k, v=v, o=o, stats=stats, ro_q=ro_q, ro_k=ro_k, **kw))

        g = graph()
        kw, ro_q, ro_k = extras(g)
        t = dict(q=io(g, "q", hq, smax_q, ro_q), k=io(g, "k", hkv, smax_k, ro_k), v=io(g, "v", hkv, smax_k, ro_k),
                 o=io(g, "o", hq, smax_q, ro_q), dO=io(g, "dO", hq, smax_q, ro_q))
        t["stats"] = g.tensor(name="stats", dim=[b, hq, smax_q, 1], stride=[hq * smax_q, smax_q, 1, 1], data_type=f32)
        dq, dk, dv = g.sdpa_backward(t["q"], t["k"], t["v"], t["o"], t["dO"], t["stats"], name="sdpa_bwd",
                                     attn_scale=self.scale, **mask, **kw)
        for x, h, s, ro in ((dq, hq, smax_q, ro_q), (dk, hkv, smax_k, ro_k), (dv, hkv, smax_k, ro_k)):
            x.set_output(True).set_dim([b, h, s, d]).set_stride(_bshd_stride(s, h, d))
            if ro is not None:
                x.set_ragged_offset(ro)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.bwd = (g, dict(**t, dQ=dq, dK=dk, dV=dv, ro_q=ro_q, ro_k=ro_k, **kw))
        ws = max(self.fwd[0].get_workspace_size(), self.bwd[0].get_workspace_size())
        self.workspace = torch.empty(max(ws, 1), device="cuda", dtype=torch.uint8)

    def _meta(self, names, hq, hkv, d):
        if self.lens is None:
            return {}
        cu = torch.tensor([0] + list(torch.tensor(self.lens).cumsum(0)), dtype=torch.int32, device="cuda")
        n = torch.tensor(self.lens, dtype=torch.int32, device="cuda").view(-1, 1, 1, 1)
        return {names["ro_q"]: (cu * hq * d).view(-1, 1, 1, 1), names["ro_k"]: (cu * hkv * d).view(-1, 1, 1, 1),
                names["seq_len_q"]: n, names["seq_len_kv"]: n}

    def forward(self, q, k, v):
        g, t = self.fwd
        b, hq, hkv, d, smax_q, _ = self.dims
        out = torch.empty_like(q)
        stats = torch.empty(b, hq, smax_q, 1, device="cuda", dtype=torch.float32)
        g.execute({t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["stats"]: stats, **self._meta(t, hq, hkv, d)},
                  self.workspace, handle=self.handle)
        return out, stats

    def backward(self, do, q, k, v, out, stats):
        g, t = self.bwd
        b, hq, hkv, d, _, _ = self.dims
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        g.execute({t["q"]: q, t["k"]: k, t["v"]: v, t["o"]: out, t["dO"]: do, t["stats"]: stats, t["dQ"]: dq,
                   t["dK"]: dk, t["dV"]: dv, **self._meta(t, hq, hkv, d)}, self.workspace, handle=self.handle)
        return dq, dk, dv

    def lse(self, stats):
        """Stats `[B, H, S_max, 1]` as seqpar's lse `[1, H, total]` (packed rows: each document's rows)."""
        if self.lens is None:
            return stats[..., 0]
        return torch.cat([stats[i, :, :n, 0] for i, n in enumerate(self.lens)], dim=1)[None]


def _inputs(sq, sk, hq, hkv, d, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, do = (torch.randn(1, sq, hq, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, sk, hkv, d, device="cuda", generator=g).bfloat16() for _ in range(2))
    return q, k, v, do


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(cudnn, handle, name, sq, sk, hq, hkv, d, lens=None):
    from seqpar.kernels.flash_attn.reference import flash_attn_backward_reference, flash_attn_reference
    q, k, v, do = _inputs(sq, sk, hq, hkv, d, seed=sq + sk)
    a = Attn(cudnn, handle, hq, hkv, d, sq, sk, bottom_right=lens is None, lens=lens)
    out, stats = a.forward(q, k, v)
    grads = a.backward(do, q, k, v, out, stats)
    if lens is None:
        kw = dict(cu_seqlens_q=torch.tensor([0, sq], device="cuda", dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, sk], device="cuda", dtype=torch.int32))
    else:
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
        kw = dict(cu_seqlens=cu)
    exact = [t.double() for t in (q, k, v)]
    r_out, r_lse = flash_attn_reference(*exact, causal=True, return_lse=True, **kw)
    r_grads = flash_attn_backward_reference(do.double(), *exact, r_out, r_lse, causal=True, **kw)
    errs = dict(out=_rel(out, r_out), lse=_rel(a.lse(stats), r_lse),
                **{n: _rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), grads, r_grads)})
    log(step="check", case=name, rel_err_vs_fp64={n: f"{e:.2e}" for n, e in errs.items()},
        passed=all(e <= (1e-3 if n == "lse" else 1e-2) for n, e in errs.items()))


def timing(cudnn, handle, name, sq, sk, hq, hkv, d, lens=None):
    from seqpar.kernels.flash_attn import triton as ft
    q, k, v, do = _inputs(sq, sk, hq, hkv, d, seed=1)
    a = Attn(cudnn, handle, hq, hkv, d, sq, sk, bottom_right=lens is None, lens=lens)
    out, stats = a.forward(q, k, v)
    if lens is None:
        cu_q, cu_k = (torch.tensor([0, n], device="cuda", dtype=torch.int32) for n in (sq, sk))
    else:
        cu_q = cu_k = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), device="cuda", dtype=torch.int32)
    t_out, t_lse, _ = ft.attention_forward(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    res = {}
    for _ in range(2):  # rounds
        res.setdefault("cudnn_fwd", []).append(_ms(lambda: a.forward(q, k, v)))
        res.setdefault("cudnn_bwd", []).append(_ms(lambda: a.backward(do, q, k, v, out, stats)))
        res.setdefault("triton_fwd", []).append(_ms(lambda: ft.attention_forward(
            q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)))
        res.setdefault("triton_bwd", []).append(_ms(lambda: ft.attention_backward(
            do, q, k, v, t_out, t_lse, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)))
    best = {n: round(min(v), 3) for n, v in res.items()}
    log(step="timing", case=name, heads=(hq, hkv, d), ms=best, rounds=res,
        cudnn_over_triton=dict(fwd=round(best["cudnn_fwd"] / best["triton_fwd"], 3),
                               bwd=round(best["cudnn_bwd"] / best["triton_bwd"], 3)))


def main(out_path):
    try:
        import cudnn
        handle = cudnn.create_handle()
        cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
        log(step="import", frontend=getattr(cudnn, "__version__", "?"), backend=cudnn.backend_version())
    except Exception:
        log(step="import", error=traceback.format_exc()[-1500:])
        return json.dump(rows, open(out_path, "w"), indent=1)
    from seqpar.bench.ring import lognormal_lengths
    steps = [(check, "piece 300 over 1000, 8/2 x 64", (300, 1000, 8, 2, 64)),
             (check, "packed [300, 1, 17, 130, 555], 8 x 128", (1003, 1003, 8, 8, 128, [300, 1, 17, 130, 555])),
             (timing, "piece 8k over 56k", (8192, 57344, 32, 8, 64)),
             (timing, "piece 2k over 30k", (2048, 30720, 32, 8, 64)),
             (timing, "packed 16k lognormal", (16384, 16384, 32, 32, 128, lognormal_lengths(16384))),
             (timing, "packed 64k lognormal", (65536, 65536, 32, 32, 128, lognormal_lengths(65536)))]
    for fn, name, args in steps:
        try:
            fn(cudnn, handle, name, *args)
        except Exception:
            log(step=fn.__name__, case=name, error=traceback.format_exc()[-2500:])
        json.dump(rows, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
