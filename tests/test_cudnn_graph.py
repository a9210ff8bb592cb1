"""Attention through cuDNN's graph API (kernels/flash_attn/cudnn_graph.py).

CPU: the layout of a row's documents in cuDNN's slots (buckets, padded slots, blind rows) and the
lse <-> stats index both ways. GPU (`-m gpu`, where nvidia-cudnn-frontend imports): bf16 against
float64 on pieces over a prefix and packed rows of awkward lengths, through the public entry
points with SEQPAR_ATTN_KERNEL=graph.
"""
import itertools

import pytest
import torch

from seqpar.kernels.flash_attn import cudnn_graph as cg
from seqpar.kernels.flash_attn.reference import flash_attn_backward_reference, flash_attn_reference
from seqpar.kernels.flash_attn.split import bucket_len


def test_layout_slots_buckets_and_blind_rows():
    # documents: equal lengths, empty, more queries than keys (4 blind rows), fewer queries than keys
    lay = cg.layout((0, 5, 5, 300, 1000), (0, 5, 9, 300, 1200), True, "cpu")
    assert lay.docs == 4 and lay.max_q == bucket_len(700, cg.PER_OCTAVE) and lay.max_k == bucket_len(900, cg.PER_OCTAVE)
    assert lay.q_off.tolist() == [0, 5, 5, 300, 1000] and lay.k_len.tolist() == [5, 4, 291, 900]
    assert (lay.total_q, lay.total_k) == (bucket_len(1000, cg.PER_OCTAVE), bucket_len(1200, cg.PER_OCTAVE)) and not lay.square
    assert lay.blind.tolist() == [5, 6, 7, 8]
    assert lay.rows.tolist() == list(range(5)) + [2 * lay.max_q + i for i in range(295)] + \
        [3 * lay.max_q + i for i in range(700)]
    # five documents take eight slots: the padded ones are empty and sit at the row's end
    five = cg.layout((0, 1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 5), False, "cpu")
    assert five.docs == 8 and five.q_off.tolist() == [0, 1, 2, 3, 4, 5, 5, 5, 5] and five.q_len.tolist()[5:] == [0] * 3
    assert five.blind is None  # non-causal: every row sees its document's keys
    assert cg.layout((0, 2, 5), (0, 0, 4), False, "cpu").blind.tolist() == [0, 1]  # ... unless it has none
    with pytest.raises(ValueError, match="same documents"):
        cg.layout((0, 4, 8), (0, 8), True, "cpu")
    with pytest.raises(ValueError, match="start at 0"):
        cg.layout((2, 4, 8), (2, 4, 8), True, "cpu")


def test_graph_buckets_env(monkeypatch):
    monkeypatch.setenv(cg.BUCKETS_ENV, "1")  # powers of two: fewer graphs to build
    assert cg.layout((0, 700), (0, 700), True, "cpu").max_q == 1024
    monkeypatch.setenv(cg.BUCKETS_ENV, "3")
    with pytest.raises(ValueError, match="SEQPAR_CUDNN_GRAPH_BUCKETS='3': need a power of two"):
        cg.layout((0, 700), (0, 700), True, "cpu")


def test_fits_bounds_the_stats_and_the_dq_accumulator(monkeypatch):
    monkeypatch.delenv("SEQPAR_CUDNN_SCRATCH_MB", raising=False)
    even = [0] + [512 * (i + 1) for i in range(64)]  # 64 documents of 512: 64 slots x 512 rows
    assert cg.fits(cg.layout(tuple(even), tuple(even), True, "cpu"), 32 * 128)
    skewed = (0, 30000) + tuple(30000 + 10 * (i + 1) for i in range(200))  # 256 slots x ~32k rows for 32k tokens
    assert not cg.fits(cg.layout(skewed, skewed, True, "cpu"), 32 * 128)
    long_row = cg.layout((0, 1 << 20), (0, 1 << 20), True, "cpu")  # 1M tokens: dQ in fp32 16 GiB at 32 x 128
    assert not cg.fits(long_row, 32 * 128) and cg.fits(long_row, 4 * 64)  # 1 GiB at 4 x 64
    monkeypatch.setenv("SEQPAR_CUDNN_SCRATCH_MB", str(16 << 10))
    assert cg.fits(long_row, 32 * 128)


def test_backward_workspace_counts_gqa_key_gradients(monkeypatch):
    monkeypatch.delenv("SEQPAR_CUDNN_SCRATCH_MB", raising=False)
    # the shapes of the H100 measurements (2026-11-28-gpu-22nd/call1): the graphs' own figures within 1%
    cases = [((4096,) * 8, (4096,) * 8, 32 * 64, True, 809_505_408),
             ((8192, 1000, 300), (57344, 1000, 300), 32 * 64, True, 1_161_825_152),
             ((2048,) * 30, (30720,) * 30, 32 * 64, True, 17_725_144_192)]
    for lq, lk, width, gqa, measured in cases:
        bounds = [tuple(itertools.accumulate(n, initial=0)) for n in (lq, lk)]
        lay = cg.layout(*bounds, True, "cpu")
        assert abs(cg.backward_workspace(lay, width, gqa) / measured - 1) < 1e-2
    # a server's pieces over long prefixes with GQA: 17 GB of fp32 key gradients, refused; without GQA 0.5 GB
    lay = cg.layout(*[tuple(itertools.accumulate(n, initial=0)) for n in cases[2][:2]], True, "cpu")
    assert not cg.fits(lay, 32 * 64, gqa=True) and cg.fits(lay, 32 * 64, gqa=False)


def test_dispatch_rule(monkeypatch):
    """auto: packed rows (no lse, the model's forward with its autograd) where the family takes them;
    the lse paths (ring steps, disagg servers) and dense rows stay off it; graph: every call it takes."""
    from seqpar.kernels import dispatch
    monkeypatch.setattr(dispatch, "_graph_applies", lambda *a, **kw: True)
    x = torch.empty(1, 8, 2, 64)
    cu = torch.tensor([0, 3, 8])
    for choice, op, kw, want in [("auto", "flash_attn", dict(cu_seqlens=cu), True),
                                 ("auto", "flash_attn", dict(cu_seqlens=cu, return_lse=True), False),
                                 ("auto", "flash_attn_backward", dict(cu_seqlens=cu), False),
                                 ("auto", "flash_attn", {}, False),
                                 ("split", "flash_attn", dict(cu_seqlens=cu), False),
                                 ("graph", "flash_attn", dict(cu_seqlens=cu, return_lse=True), True),
                                 ("graph", "flash_attn_backward", {}, True)]:
        monkeypatch.setenv("SEQPAR_ATTN_KERNEL", choice)
        assert dispatch._wants_graph(op, x, x, x, **kw) is want, (choice, op, kw)
    monkeypatch.setattr(dispatch, "_graph_applies", lambda *a, **kw: False)  # not imported, or past its bounds
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "auto")
    assert not dispatch._wants_graph("flash_attn", x, x, x, cu_seqlens=cu)


def test_build_stats_for_the_step_metrics(monkeypatch):
    monkeypatch.setattr(cg, "_BUILT", {"count": 0, "seconds": 0.0})
    assert cg.build_stats() == {}  # no key in runs that never build a graph
    monkeypatch.setattr(cg, "_BUILT", {"count": 3, "seconds": 0.51234})
    assert cg.build_stats() == {"attn_graph_builds": 3, "attn_graph_build_s": 0.512}


def test_lse_and_stats_round_trip():
    lay = cg.layout((0, 3, 3, 10), (0, 3, 5, 10), True, "cpu")  # doc 1 empty; doc 2: 7 queries over 5 keys
    lse = torch.randn(1, 4, 10, dtype=torch.float64)
    lse[..., 3:5] = float("-inf")  # the blind rows
    stats = cg.stats_from_lse(lse, lay)
    assert stats.shape == (lay.docs, 4, lay.max_q, 1) and torch.isfinite(stats).all()
    assert torch.equal(stats[2, :, 2:7, 0], lse[0, :, 5:10].float())
    back = cg.lse_from_stats(stats, lay, 1, 10)
    assert torch.equal(back[..., 5:], lse[..., 5:].float()) and torch.equal(back[..., :3], lse[..., :3].float())
    assert torch.isneginf(back[..., 3:5]).all()
    # dense rows of a batch are its documents
    dense = cg.layout((0, 6, 12), (0, 6, 12), True, "cpu")
    lse2 = torch.randn(2, 3, 6)
    assert torch.equal(cg.lse_from_stats(cg.stats_from_lse(lse2, dense), dense, 2, 6), lse2)


gpu = pytest.mark.gpu


def _needs_frontend():
    if not cg.available():
        pytest.skip("nvidia-cudnn-frontend does not import here (docs/benchmarks/README.md: how it travels)")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq, Hkv, D", [(8, 2, 64), (8, 8, 128)])
def test_gpu_graph_tasks_bf16_vs_reference(monkeypatch, causal, Hq, Hkv, D):
    """What disagg servers and ring steps send: query and key boundaries of their own (pieces over a
    prefix, an empty document, one with more queries than keys), lse out, the backward from it."""
    _needs_frontend()
    from seqpar.kernels import dispatch
    from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "graph")
    lq, lk = [300, 1, 0, 700, 17, 130, 9], [1000, 1, 5, 500, 17, 4000, 0]
    g = torch.Generator(device="cuda").manual_seed(Hq + D + causal)
    q, do = (torch.randn(1, sum(lq), Hq, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    k, v = (torch.randn(1, sum(lk), Hkv, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    cu = [torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32, device="cuda") for n in (lq, lk)]
    kw = dict(causal=causal, cu_seqlens_q=cu[0], cu_seqlens_k=cu[1])
    assert dispatch.flash_attn_choice(q, k, v, return_lse=True, **kw)[0] == "cudnn_graph"
    out, lse = flash_attn(q, k, v, return_lse=True, **kw)
    grads = flash_attn_backward(do, q, k, v, out, lse, **kw)
    exact = [t.double() for t in (q, k, v)]
    r_out, r_lse = flash_attn_reference(*exact, return_lse=True, **kw)
    r_grads = flash_attn_backward_reference(do.double(), *exact, r_out, r_lse, **kw)
    seen = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows without a visible key: lse -inf"
    assert _rel(lse[seen], r_lse[seen]) <= 1e-3
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        assert _rel(a, b) <= 1e-2, f"{name} vs fp64: {_rel(a, b):.2e}"


def _autograd_vs_reference(monkeypatch, shape, heads, seed, choice="graph", **kw):
    """flash_attn's autograd on the graph family (the model's path) against float64."""
    _needs_frontend()
    from seqpar import kernels
    from seqpar.kernels import dispatch
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", choice)
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(*shape, n, heads[2], device="cuda", generator=g).bfloat16()
                   for n in (heads[0], heads[1], heads[1], heads[0]))
    assert dispatch.flash_attn_choice(q, k, v, **kw)[0] == "cudnn_graph"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    exact = [t.double() for t in (q, k, v)]
    r_out, r_lse = flash_attn_reference(*exact, return_lse=True, **kw)
    r_grads = flash_attn_backward_reference(do.double(), *exact, r_out, r_lse, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (r_out, *r_grads)):
        assert _rel(a, b) <= 1e-2, f"{name} vs fp64: {_rel(a, b):.2e}"


@gpu
def test_gpu_graph_packed_autograd_vs_reference(monkeypatch):
    """Packed self-attention, awkward lengths, GQA 16/4 x 128: the default dispatch (GRAPH_FASTER)."""
    lens = [3000, 1, 17, 5000, 2100, 600, 1, 999]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    _autograd_vs_reference(monkeypatch, (1, sum(lens)), (16, 4, 128), 0, choice="auto", cu_seqlens=cu)


@gpu
def test_gpu_graph_dense_batch_autograd_vs_reference(monkeypatch):
    """Dense rows of a batch (no boundaries): each row one document, queries and keys equal."""
    _autograd_vs_reference(monkeypatch, (2, 1000), (8, 2, 64), 1)
