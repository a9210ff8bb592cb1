"""The Triton flash-attention kernel against the float64 reference: on CPU through Triton's
interpreter (tiny shapes, 32-row tiles so that documents span several tiles and the diagonal
cuts inner blocks), and on CUDA (`gpu`) in bf16 at real sizes.

Every case checks out, lse (-inf exactly where a row sees no key) and the gradients into q, k, v;
the merge entry point is checked against merging the reference's blocks in float64."""

import pytest
import torch

from seqpar.kernels.flash_attn.reference import flash_attn_backward_reference, flash_attn_reference
from tests.triton_interpreter import interp_only, run_interpreter_tests

pytest.importorskip("triton")

F64 = torch.float64


def test_triton_interpreter_subprocess():
    run_interpreter_tests(__file__)


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(B, Sq, Sk, Hq, Hkv, D, seed, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=F64)  # noqa: E731
    return r(B, Sq, Hq, D), r(B, Sk, Hkv, D), r(B, Sk, Hkv, D), r(B, Sq, Hq, D)


def _rel(got, exact):
    return ((got.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


def _check_forward_backward(ft, q, k, v, do, dtype, tol, **kw):
    """Forward (out, lse) and the kernel backward from the reference's (out, lse), vs float64."""
    # the reference sees the same rounded inputs as the kernel
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))
    out, lse, _ = ft.attention_forward(q.to(dtype), k.to(dtype), v.to(dtype), **kw)
    ref_out, ref_lse = flash_attn_reference(q, k, v, return_lse=True, **kw)
    blind = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), blind), "lse must be -inf exactly on rows without a visible key"
    assert (out.double()[blind.transpose(1, 2)] == 0).all(), "rows without a visible key must be 0"
    assert _rel(out, ref_out) <= tol, f"out: {_rel(out, ref_out):.2e}"
    assert _rel(lse[~blind], ref_lse[~blind]) <= tol, "lse"
    grads = ft.attention_backward(do.to(dtype), q.to(dtype), k.to(dtype), v.to(dtype), ref_out.to(dtype),
                                  ref_lse.float(), **kw)
    exact = flash_attn_backward_reference(do, q, k, v, ref_out, ref_lse, **kw)
    for name, got, want in zip(("dq", "dk", "dv"), grads, exact):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert _rel(got, want) <= tol, f"{name}: relative error {_rel(got, want):.2e} > {tol:.0e}"


# ---------------------------------------------------------------- CPU, Triton interpreter

@interp_only
def test_interp_tune_buckets_runs_each_bucket_up_to_the_row():
    from seqpar.kernels.flash_attn import triton as ft

    assert ft.tune_buckets(1, 1, 16, 1000, dtype=torch.float32, device="cpu", doc_len=100) == [1024]


@interp_only
def test_interp_dense_rows_gqa_and_unequal_lengths():
    import triton

    from seqpar.kernels.flash_attn import triton as ft

    # (B, Sq, Sk, Hq, Hkv, D, causal): GQA 4/2 and 2/1, Sq > Sk (first rows see nothing), Sq < Sk,
    # lengths that are not multiples of the 32-row tile or the 16-wide inner block
    for i, (B, Sq, Sk, Hq, Hkv, D, causal) in enumerate([(2, 70, 70, 4, 2, 32, True), (1, 75, 41, 2, 1, 16, True),
                                                         (2, 37, 90, 2, 1, 16, True), (1, 50, 33, 2, 2, 16, False)]):
        q, k, v, do = _inputs(B, Sq, Sk, Hq, Hkv, D, seed=i)
        _check_forward_backward(ft, q, k, v, do, torch.float32, 2e-5, causal=causal, softmax_scale=0.3)
    # the dk/dv kernel's other loop structure (one loop that always masks; the GPU's untuned pick)
    split, = ft._attn_bwd_dkdv.configs
    ft._attn_bwd_dkdv.configs = [triton.Config({**split.kwargs, "SPLIT": False}, num_warps=4, num_stages=1)]
    try:
        q, k, v, do = _inputs(1, 75, 41, 4, 2, 16, seed=9)
        _check_forward_backward(ft, q, k, v, do, torch.float32, 2e-5, causal=True)
        lens = [1, 33, 70, 5]
        q, k, v, do = _inputs(1, 109, 109, 2, 1, 16, seed=10)
        _check_forward_backward(ft, q, k, v, do, torch.float32, 2e-5, causal=True, cu_seqlens_q=_cu(lens),
                                cu_seqlens_k=_cu(lens))
    finally:
        ft._attn_bwd_dkdv.configs = [split]


@interp_only
def test_interp_tma_loads_equal_the_reference(monkeypatch):
    from seqpar.kernels.flash_attn import triton as ft
    from seqpar.kernels.tma import use_tma

    # the GPU's default loads (TMA descriptors over each document; past its end they read zeros)
    monkeypatch.setenv("SEQPAR_TMA", "1")
    q, k, v, do = _inputs(2, 75, 41, 4, 2, 16, seed=21)
    assert use_tma(q, k, v, do)
    _check_forward_backward(ft, q, k, v, do, torch.float32, 2e-5, causal=True)
    lq, lk = [1, 33, 70, 0, 5, 1, 40], [3, 1, 100, 2, 0, 64, 40]
    q, k, v, do = _inputs(1, sum(lq), sum(lk), 4, 2, 16, seed=22)
    _check_forward_backward(ft, q, k, v, do, torch.float32, 2e-5, causal=True, cu_seqlens_q=_cu(lq),
                            cu_seqlens_k=_cu(lk))
    # strides TMA cannot take (a row of 3 heads of 2 fp32 = 24 bytes) fall back to pointer loads
    assert not use_tma(torch.zeros(1, 8, 3, 2))
    monkeypatch.setenv("SEQPAR_TMA", "0")
    assert not use_tma(q, k, v)
    monkeypatch.setenv("SEQPAR_TMA", "yes")
    with pytest.raises(ValueError, match="SEQPAR_TMA"):
        use_tma(q, k, v)
    monkeypatch.delenv("SEQPAR_TMA")
    assert not use_tma(q, k, v)  # unset: on sm_90 and later only


@interp_only
@pytest.mark.parametrize("causal", [True, False])
def test_interp_packed_documents_awkward_lengths(causal):
    from seqpar.kernels.flash_attn import triton as ft

    # shared boundaries with length-1 and empty documents, then separate q/k boundaries: more
    # queries than keys, no keys at all, a one-row document over many keys
    lq = [1, 33, 70, 0, 5, 1, 40]
    lk = [3, 1, 100, 2, 0, 64, 40]
    for j, (a, b) in enumerate([(lq, lq), (lq, lk)]):
        q, k, v, do = _inputs(1, sum(a), sum(b), 4, 2, 16, seed=10 + j)
        _check_forward_backward(ft, q, k, v, do, torch.float32, 2e-5, causal=causal,
                                cu_seqlens_q=_cu(a), cu_seqlens_k=_cu(b))


@interp_only
def test_interp_merge_in_place_equals_merged_reference_blocks():
    from seqpar.kernels.flash_attn import triton as ft

    # two ring steps into strided views of larger buffers (as ring attention holds them), fp32 and bf16 out
    lq, lk1, lk2 = [5, 40, 1, 20], [3, 40, 0, 20], [7, 10, 2, 0]
    q, k1, v1, _ = _inputs(1, sum(lq), sum(lk1), 4, 2, 16, seed=3)
    _, k2, v2, _ = _inputs(1, sum(lq), sum(lk2), 4, 2, 16, seed=4)
    blocks = [(k1, v1, lk1, True), (k2, v2, lk2, False)]
    parts = [flash_attn_reference(q, k, v, causal=c, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), return_lse=True)
             for k, v, lk, c in blocks]
    lse_ref = torch.logaddexp(parts[0][1], parts[1][1])
    top = torch.where(torch.isfinite(lse_ref), lse_ref, 0)
    out_ref = sum(o * torch.exp(l - top).transpose(1, 2)[..., None] for o, l in parts)
    for out_dtype in (torch.float32, torch.bfloat16):
        big_out = torch.zeros(1, sum(lq) + 3, 4, 16, dtype=out_dtype)
        big_lse = torch.full((1, 4, sum(lq) + 3), float("-inf"))
        out, lse = big_out[:, 2:-1], big_lse[:, :, 2:-1]
        for k, v, lk, c in blocks:
            ft.flash_attn_merge_(q.float(), k.float(), v.float(), out, lse, causal=c, cu_seqlens_q=_cu(lq),
                                 cu_seqlens_k=_cu(lk))
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
        fin = torch.isfinite(lse_ref)
        assert _rel(lse[fin], lse_ref[fin]) <= 1e-6
        assert _rel(out, out_ref) <= (1e-6 if out_dtype == torch.float32 else 1e-2)
        assert torch.isneginf(big_lse[:, :, :2]).all() and (big_out[:, :2] == 0).all()  # nothing outside the view


@interp_only
def test_interp_autograd_through_out_and_lse():
    from seqpar.kernels.flash_attn import triton as ft

    _check_autograd_through_out_and_lse(ft)


def _check_autograd_through_out_and_lse(ft):
    lq, lk = [3, 40, 1, 20], [1, 40, 0, 33]
    q, k, v, do = _inputs(1, sum(lq), sum(lk), 4, 1, 16, seed=5)
    weights = torch.randn(1, 4, sum(lq), generator=torch.Generator().manual_seed(6), dtype=F64)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), softmax_scale=0.4,
                      return_lse=True)
        lse = torch.where(torch.isfinite(lse), lse, 0)
        loss = (out.double() * do).sum() + (lse.double() * weights).sum()
        return torch.autograd.grad(loss, leaves)

    for name, got, want in zip("qkv", grads(ft.flash_attn_triton, torch.float32), grads(flash_attn_reference, F64)):
        assert _rel(got, want) <= 2e-5, f"d{name}"


def _views(t, seed):
    """Three destinations of t's shape and dtype, prefilled with noise: a row slice of a longer
    buffer (unit stride on D: the kernels store into it), a view strided on heads (still unit
    D: direct), and one strided on D (the buffer-then-copy fallback)."""
    g = torch.Generator().manual_seed(seed)
    B, S, H, D = t.shape
    big = lambda *shape: torch.randn(*shape, generator=g).to(t.device, t.dtype)  # noqa: E731
    return [big(B, S + 7, H, D)[:, 4:S + 4], big(B, S, 2 * H, D)[:, :, 1::2], big(B, S, H, 2 * D)[..., ::2]]


def _check_destinations(ft, q, k, v, do, **kw):
    """out= and dq/dk/dv= (overwrite, then accumulate) store exactly the plain calls' results (in
    16-bit, accumulating in the kernel rounds once where the plain call and add_ round twice)."""
    exact = q.dtype == torch.float32
    out, lse, _ = ft.attention_forward(q, k, v, **kw)
    plain = ft.attention_backward(do, q, k, v, out, lse, **kw)
    for dest in _views(out, 1):
        got, got_lse, _ = ft.attention_forward(q, k, v, out=dest, **kw)
        assert got is dest and torch.equal(dest, out) and torch.equal(got_lse, lse)
    # view kinds (0 rows, 1 head-strided, 2 D-strided) of dq, dk, dv per call: overwriting, then
    # accumulating inside the kernel (dk, dv unit-strided on D), then after it (dk D-strided)
    for accumulate, kinds in ((False, (0, 1, 2)), (True, (1, 0, 1)), (True, (2, 2, 0))):
        dests = [_views(t, 2 + i)[which] for i, (t, which) in enumerate(zip((q, k, v), kinds))]
        before = [d.clone() for d in dests]
        got = ft.attention_backward(do, q, k, v, out, lse, dq=dests[0], dk=dests[1], dv=dests[2],
                                    accumulate=accumulate, **kw)
        for i, (d, b, p) in enumerate(zip(dests, before, plain)):
            name = ("dq", "dk", "dv")[i]
            assert got[i] is d, name
            if accumulate and i:
                want = b.double() + p.double()
                assert torch.equal(d, b + p) if exact else _rel(d, want) <= 1e-2, (name, kinds)
            else:
                assert torch.equal(d, p), (name, accumulate, kinds)


@interp_only
def test_interp_destinations_equal_plain_calls():
    from seqpar.kernels.flash_attn import triton as ft

    # packed documents with separate q/k boundaries (a document without keys), then dense GQA rows
    lq, lk = [3, 40, 1, 20], [1, 40, 0, 33]
    q, k, v, do = (t.float() for t in _inputs(1, sum(lq), sum(lk), 4, 2, 16, seed=13))
    _check_destinations(ft, q, k, v, do, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    q, k, v, do = (t.float() for t in _inputs(2, 37, 45, 4, 2, 16, seed=14))
    _check_destinations(ft, q, k, v, do, causal=False, softmax_scale=0.3)


def test_key_tile_follows_head_dim_and_untuned_runs_keep_one_config_per_tile(monkeypatch):
    from seqpar.kernels.flash_attn import triton as ft

    if ft._interpreting():
        pytest.skip("the interpreter runs one small config")
    assert ft.table_blocks(64) == (128, 128) and ft.table_blocks(128) == (128, 64)
    prune = ft._prune_for("BLOCK_N")
    tiles = lambda configs: [c.kwargs["BLOCK_N"] for c in configs]  # noqa: E731
    monkeypatch.setenv("SEQPAR_FLASH_TUNE", "0")
    untuned = ft._configs("BLOCK_N", "BLOCK_M", ft._DKDV_OPTIONS, extra=("SPLIT",))
    assert tiles(untuned) == [64, 128]  # the first option of each key tile
    for head_dim, tile in ((64, 128), (128, 64)):
        for varlen in (True, False):  # one config left: no tuning run
            assert tiles(prune(untuned, {}, VARLEN=varlen, HEAD_DIM=head_dim)) == [tile]
    monkeypatch.setenv("SEQPAR_FLASH_TUNE", "1")
    tuned = ft._configs("BLOCK_N", "BLOCK_M", ft._DKDV_OPTIONS, extra=("SPLIT",))
    assert prune(tuned, {}, VARLEN=False, HEAD_DIM=64) == tuned  # dense rows tune every tile
    assert set(tiles(prune(tuned, {}, VARLEN=True, HEAD_DIM=64))) == {128}


def test_tile_table_covers_each_document_once_longest_first():
    from seqpar.kernels.flash_attn.triton import tile_table

    lq, lk = [1, 0, 130, 64, 65], [3, 2, 130, 0, 200]
    table = tile_table(_cu(lq), _cu(lk), 64, sum(lq), True, True)
    assert table.shape == (sum(lq) // 64 + 5, 2) and table.dtype == torch.int32
    used = [tuple(r) for r in table.tolist() if r[0] >= 0]
    assert sorted(used) == [(0, 0), (2, 0), (2, 64), (2, 128), (3, 0), (4, 0), (4, 64)]
    assert all(r[0] == -1 for r in table.tolist()[len(used):])  # padding only at the end
    # causal work (keys the tile's last row sees): doc 4's second tile (200 keys) before doc 3 (none)
    assert used.index((4, 64)) < used.index((2, 0)) and used[-1] == (3, 0)
    k_table = tile_table(_cu(lk), _cu(lq), 64, sum(lk), False, False)
    assert sorted(tuple(r) for r in k_table.tolist() if r[0] >= 0) == [(0, 0), (1, 0), (2, 0), (2, 64), (2, 128),
                                                                       (4, 0), (4, 64), (4, 128), (4, 192)]


def test_attention_case_and_choice_on_cpu(monkeypatch):
    from seqpar.kernels import dispatch

    x = torch.zeros(1, 10, 2, 64)
    assert dispatch.attention_case(x, x) == "dense"
    assert dispatch.attention_case(x, x, cu_seqlens=_cu([10])) == "dense"  # one document
    assert dispatch.attention_case(x, x, cu_seqlens_q=_cu([4, 6]), return_lse=True) == "packed_lse"
    assert not dispatch.triton_flash_applies(x, x, x)  # CPU
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "triton")
    assert dispatch.flash_attn_choice(x, x, x)[0] == "reference"
    assert dispatch.flash_attn_choice(x, x, x, backward=True, return_lse=True)[0] == "reference"
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "fastest")
    with pytest.raises(ValueError, match="SEQPAR_ATTN_KERNEL"):
        dispatch.flash_attn_choice(x, x, x)


def test_public_merge_off_triton_equals_attention_over_all_keys():
    from seqpar.kernels.flash_attn import flash_attn_merge_

    # CPU: the reference's (out, lse) and the merge formula in torch; two key blocks of each
    # document (one empty) merged in place equal one attention over all of them
    lq, lk1, lk2 = [4, 9, 1], [3, 0, 2], [5, 6, 1]
    q, k1, v1, _ = _inputs(1, sum(lq), sum(lk1), 4, 2, 8, seed=11)
    _, k2, v2, _ = _inputs(1, sum(lq), sum(lk2), 4, 2, 8, seed=12)
    out = torch.zeros(q.shape, dtype=F64)
    lse = torch.full((1, 4, sum(lq)), float("-inf"), dtype=F64)
    for k, v, lk in ((k1, v1, lk1), (k2, v2, lk2)):
        flash_attn_merge_(q, k, v, out, lse, causal=False, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    cat = lambda a, b, la, lb: torch.cat([t for i in range(len(lq)) for t in (  # noqa: E731
        a[:, sum(la[:i]):sum(la[:i + 1])], b[:, sum(lb[:i]):sum(lb[:i + 1])])], dim=1)
    lk = [a + b for a, b in zip(lk1, lk2)]
    ref_out, ref_lse = flash_attn_reference(q, cat(k1, k2, lk1, lk2), cat(v1, v2, lk1, lk2), causal=False,
                                            cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


# ---------------------------------------------------------------- CUDA (bf16 vs float64)

gpu = pytest.mark.gpu


def _lognormal(total, seed):
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.empty(1).log_normal_(mean=5.0, std=1.2, generator=g).clamp(1, total).item()))
    lens[-1] -= sum(lens) - total
    return [1, 1] + lens + [1]


@gpu
@pytest.mark.parametrize("shape", [
    dict(B=2, Sq=1000, Sk=1000, Hq=8, Hkv=8, D=128, causal=True),
    dict(B=1, Sq=4097, Sk=4097, Hq=32, Hkv=8, D=128, causal=True),
    dict(B=2, Sq=777, Sk=1290, Hq=4, Hkv=2, D=64, causal=True),
    dict(B=1, Sq=1290, Sk=777, Hq=4, Hkv=1, D=64, causal=True),
    dict(B=3, Sq=513, Sk=300, Hq=8, Hkv=4, D=128, causal=False),
])
def test_gpu_dense_bf16(shape):
    from seqpar.kernels.flash_attn import triton as ft

    s = shape
    q, k, v, do = _inputs(s["B"], s["Sq"], s["Sk"], s["Hq"], s["Hkv"], s["D"], seed=s["Sq"], device="cuda")
    _check_forward_backward(ft, q, k, v, do, torch.bfloat16, 1e-2, causal=s["causal"])


@gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_packed_bf16_with_length_one_documents(D, causal):
    from seqpar.kernels.flash_attn import triton as ft

    lq = _lognormal(8000, seed=D)
    q, k, v, do = _inputs(1, sum(lq), sum(lq), 16, 4, D, seed=1, device="cuda")
    cu = _cu(lq, "cuda")  # the kernel module takes both sides' boundaries (the public flash_attn maps cu_seqlens)
    _check_forward_backward(ft, q, k, v, do, torch.bfloat16, 1e-2, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu)
    lk = [n + (7 if i % 3 == 0 else -min(n, 5)) for i, n in enumerate(lq)]  # more and fewer keys, some none
    q, k, v, do = _inputs(1, sum(lq), sum(lk), 16, 4, D, seed=2, device="cuda")
    _check_forward_backward(ft, q, k, v, do, torch.bfloat16, 1e-2, causal=causal, cu_seqlens_q=_cu(lq, "cuda"),
                            cu_seqlens_k=_cu(lk, "cuda"))


@gpu
def test_gpu_merge_and_public_api(monkeypatch):
    from seqpar import kernels
    from seqpar.kernels import dispatch
    from seqpar.kernels.flash_attn import flash_attn_merge_

    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "triton")
    lq = _lognormal(3000, seed=7)
    q, k, v, do = _inputs(1, sum(lq), sum(lq), 8, 2, 128, seed=8, device="cuda")
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    cu = _cu(lq, "cuda")
    assert dispatch.flash_attn_choice(qb, kb, vb, cu_seqlens=cu)[0] == "triton"
    # the keys in two halves of each document, merged in place: equals attention over all of them
    half = [n // 2 for n in lq]
    idx1 = torch.cat([torch.arange(a, a + h) for a, h in zip(_cu(lq)[:-1].tolist(), half)]).cuda()
    idx2 = torch.cat([torch.arange(a + h, a + n) for a, h, n in zip(_cu(lq)[:-1].tolist(), half, lq)]).cuda()
    out = torch.zeros(q.shape, device="cuda")
    lse = torch.full((1, 8, sum(lq)), float("-inf"), device="cuda")
    flash_attn_merge_(qb, kb[:, idx1], vb[:, idx1], out, lse, causal=False, cu_seqlens_q=cu,
                              cu_seqlens_k=_cu(half, "cuda"))
    flash_attn_merge_(qb, kb[:, idx2], vb[:, idx2], out, lse, causal=False, cu_seqlens_q=cu,
                              cu_seqlens_k=_cu([n - h for n, h in zip(lq, half)], "cuda"))
    ref_out, ref_lse = flash_attn_reference(qb.double(), kb.double(), vb.double(), causal=False, cu_seqlens=cu,
                                            return_lse=True)
    assert _rel(out, ref_out) <= 1e-2 and _rel(lse, ref_lse) <= 1e-3
    # autograd through the public entry point
    leaves = [t.clone().requires_grad_() for t in (qb, kb, vb)]
    o = kernels.flash_attn(*leaves, cu_seqlens=cu)
    grads = torch.autograd.grad(o, leaves, do.bfloat16())
    exact = [t.double().requires_grad_() for t in (qb, kb, vb)]
    ref = flash_attn_reference(*exact, cu_seqlens=cu)
    for got, want in zip(grads, torch.autograd.grad(ref, exact, do)):
        assert _rel(got, want) <= 1e-2


@gpu
def test_gpu_destinations_bf16_equal_plain_calls():
    from seqpar.kernels.flash_attn import triton as ft

    lq = _lognormal(4000, seed=3)
    lk = [n + (7 if i % 3 == 0 else -min(n, 5)) for i, n in enumerate(lq)]
    q, k, v, do = (t.bfloat16() for t in _inputs(1, sum(lq), sum(lk), 16, 4, 128, seed=15, device="cuda"))
    _check_destinations(ft, q, k, v, do, causal=True, cu_seqlens_q=_cu(lq, "cuda"), cu_seqlens_k=_cu(lk, "cuda"))
    q, k, v, do = (t.bfloat16() for t in _inputs(2, 1000, 1000, 8, 8, 64, seed=16, device="cuda"))
    _check_destinations(ft, q, k, v, do, causal=True)


@gpu
def test_gpu_public_destinations_on_the_dispatched_kernel():
    """Whatever kernel the dispatcher picks on CUDA (Triton, or torch's with the copy fallback)."""
    from seqpar import kernels
    from seqpar.kernels.flash_attn import flash_attn_backward

    lq = _lognormal(3000, seed=4)
    cu = _cu(lq, "cuda")
    q, k, v, do = (t.bfloat16() for t in _inputs(1, sum(lq), sum(lq), 8, 2, 128, seed=17, device="cuda"))
    o, lse = kernels.flash_attn(q, k, v, cu_seqlens=cu, return_lse=True)
    plain = flash_attn_backward(do, q, k, v, o, lse, cu_seqlens=cu)
    out = torch.empty(1, sum(lq) + 9, 8, 128, device="cuda", dtype=torch.bfloat16)[:, 9:]
    assert kernels.flash_attn(q, k, v, cu_seqlens=cu, out=out) is out and torch.equal(out, o)
    dests = [torch.empty(1, t.shape[1] + 3, *t.shape[2:], device="cuda", dtype=t.dtype)[:, 3:] for t in (q, k, v)]
    got = flash_attn_backward(do, q, k, v, o, lse, cu_seqlens=cu, dq=dests[0], dk=dests[1], dv=dests[2])
    # torch's flash backward accumulates dq with atomics: equal up to the order of its sums
    assert all(g is d and _rel(d, p.double()) <= 1e-2 for g, d, p in zip(got, dests, plain))


@gpu
def test_gpu_tune_buckets_tunes_each_bucket_before_its_first_call():
    from seqpar.kernels.flash_attn import triton as ft

    tuned = ft.tune_buckets(4, 2, 64, 5000, doc_len=1000)
    assert tuned == [1024, 4096, 16384]
    for kernel in (ft._attn_fwd, ft._attn_bwd_dkdv, ft._attn_bwd_dq):
        if len(kernel.configs) == 1:
            continue  # SEQPAR_FLASH_TUNE=0: Triton's autotuner keeps no picks for a single config
        buckets = {v for key in kernel.cache for v in key if v in tuned}
        assert buckets == set(tuned), (kernel, list(kernel.cache))
    lq = _lognormal(3000, seed=3)  # a later call in a tuned bucket is right
    q, k, v, do = _inputs(1, sum(lq), sum(lq), 4, 2, 64, seed=4, device="cuda")
    cu = _cu(lq, "cuda")
    _check_forward_backward(ft, q, k, v, do, torch.bfloat16, 1e-2, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
