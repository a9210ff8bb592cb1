"""Kernel references against independent brute-force fp64 computations, odd shapes, gradients,
and the dispatch rule. The `gpu` tests pair the CUDA fast paths with the references."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from seqpar import kernels
from seqpar.kernels import dispatch
from seqpar.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from seqpar.kernels.flash_attn import flash_attn_backward
from seqpar.kernels.flash_attn.reference import flash_attn_reference
from seqpar.kernels.lightning_attn.naive import lightning_attn_recurrent
from seqpar.kernels.lightning_attn.reference import lightning_attn_reference

F64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=F64):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


# ---------------------------------------------------------------- flash_attn

def _dense_attention(q, k, v, visible, scale):
    """Brute force over the whole packed row with an explicit [Sq, Sk] visibility matrix."""
    group = q.shape[2] // k.shape[2]
    heads = torch.arange(q.shape[2]) // group
    s = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, heads]) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v[:, :, heads]), lse


def _visibility(lq, lk, causal):
    """Block-diagonal per document; causal bottom-right: query j of a doc sees keys < Lk - Lq + j + 1."""
    Sq, Sk = sum(lq), sum(lk)
    vis = torch.zeros(Sq, Sk, dtype=torch.bool)
    q0 = k0 = 0
    for a, b in zip(lq, lk):
        for j in range(a):
            n = min(b, b - a + j + 1) if causal else b
            vis[q0 + j, k0:k0 + max(n, 0)] = True
        q0, k0 = q0 + a, k0 + b
    return vis


@pytest.mark.parametrize("S", [1, 37, 130])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (3, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_dense_matches_brute_force(S, heads, causal):
    g = _gen(S)
    hq, hkv = heads
    q, k, v = _randn(g, 2, S, hq, 16), _randn(g, 2, S, hkv, 16), _randn(g, 2, S, hkv, 16)
    out, lse = kernels.flash_attn(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = _dense_attention(q, k, v, _visibility([S], [S], causal), 16 ** -0.5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    assert lse.dtype == F64 and lse.shape == (2, hq, S)


@pytest.mark.parametrize("lengths", [[1, 5, 64, 65, 200], [130], [37, 1, 1]])
def test_flash_attn_packed_documents(lengths):
    g = _gen(len(lengths))
    S = sum(lengths)
    q, k, v = _randn(g, 1, S, 6, 8), _randn(g, 1, S, 2, 8), _randn(g, 1, S, 2, 8)
    out, lse = kernels.flash_attn(q, k, v, cu_seqlens=_cu(lengths), softmax_scale=0.3, return_lse=True)
    ref, ref_lse = _dense_attention(q, k, v, _visibility(lengths, lengths, True), 0.3)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_flash_attn_varlen_bottom_right_including_more_queries_than_keys():
    lq, lk = [3, 7, 1, 4, 5, 2], [5, 7, 4, 1, 0, 9]  # Lq < Lk, ==, >, and a document with no keys
    g = _gen(0)
    q, k, v = _randn(g, 1, sum(lq), 4, 8), _randn(g, 1, sum(lk), 2, 8), _randn(g, 1, sum(lk), 2, 8)
    out, lse = kernels.flash_attn(q, k, v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), return_lse=True)
    ref, ref_lse = _dense_attention(q, k, v, _visibility(lq, lk, True), 8 ** -0.5)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)
    # document 3 has 4 queries, 1 key: only its last query sees anything
    blind = sum(lq[:3]) + torch.arange(3)
    assert torch.isneginf(lse[:, :, blind]).all() and (out[:, blind] == 0).all()
    # the last query of a document sees the document's last key, so lse there is finite
    assert torch.isfinite(lse[:, :, sum(lq[:2]) - 1]).all()


def test_flash_attn_gradients_through_out_and_lse_match_dense():
    lq, lk = [2, 9, 4, 3], [6, 9, 1, 3]
    g = _gen(1)
    q, k, v = _randn(g, 1, sum(lq), 4, 8), _randn(g, 1, sum(lk), 2, 8), _randn(g, 1, sum(lk), 2, 8)
    go, gl = _randn(g, 1, sum(lq), 4, 8), _randn(g, 1, 4, sum(lq))
    vis = _visibility(lq, lk, True)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves)
        finite = torch.isfinite(lse)
        ((out * go).sum() + (torch.where(finite, lse, 0) * gl).sum()).backward()
        return [t.grad for t in leaves]

    ours = grads(lambda a, b, c: kernels.flash_attn(a, b, c, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                                                     return_lse=True))
    ref = grads(lambda a, b, c: _dense_attention(a, b, c, vis, 8 ** -0.5))
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_flash_attn_gradcheck():
    g = _gen(2)
    lq, lk = [1, 4, 3], [2, 4, 1]
    q, k, v = (_randn(g, 1, n, h, 4).requires_grad_() for n, h in ((8, 4), (7, 2), (7, 2)))

    def f(q, k, v):
        out, lse = flash_attn_reference(q, k, v, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0)

    assert torch.autograd.gradcheck(f, (q, k, v))
    dense = (_randn(g, 2, 5, 2, 4).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda *t: flash_attn_reference(*t, causal=True, return_lse=True), tuple(dense))


def test_flash_attn_fp32_keeps_dtypes():
    g = _gen(3)
    q, k, v = (_randn(g, 1, 37, 2, 8, dtype=torch.float32) for _ in range(3))
    out, lse = kernels.flash_attn(q, k, v, cu_seqlens=_cu([30, 7]), return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref, _ = _dense_attention(q.double(), k.double(), v.double(), _visibility([30, 7], [30, 7], True), 8 ** -0.5)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)


def test_flash_attn_rejects_bad_boundaries():
    q = torch.zeros(1, 5, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.flash_attn(q, q, q, cu_seqlens=_cu([2, 2]))
    with pytest.raises(ValueError, match="together"):
        kernels.flash_attn(q, q, q, cu_seqlens_q=_cu([5]))


def _destinations(shape, dtype, seed):
    """Views of `shape` into larger buffers: a contiguous row slice, and one strided on heads
    and D (every other element), each prefilled with noise that must be overwritten or added to."""
    g = _gen(seed)
    B, S, H, D = shape
    rows = _randn(g, B, S + 5, H, D, dtype=dtype)[:, 3:S + 3]
    strided = _randn(g, B, S, 2 * H, 2 * D, dtype=dtype)[:, :, ::2, ::2]
    return rows, strided


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_destinations_equal_plain_calls(causal):
    """out= and dq/dk/dv= (overwrite and accumulate) through the reference: bitwise the plain
    calls' results, or the prefill plus them."""
    g = _gen(21)
    lq, lk = [3, 17, 1, 9], [5, 11, 0, 9]  # more and fewer keys, a document without keys
    q, do = (_randn(g, 1, sum(lq), 4, 8) for _ in range(2))
    k, v = (_randn(g, 1, sum(lk), 2, 8) for _ in range(2))
    kw = dict(causal=causal, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), softmax_scale=0.3)
    o, lse = kernels.flash_attn(q, k, v, return_lse=True, **kw)
    plain = flash_attn_backward(do, q, k, v, o, lse, **kw)
    for seed, dest in enumerate(_destinations(o.shape, F64, 1)):
        got, got_lse = kernels.flash_attn(q, k, v, return_lse=True, out=dest, **kw)
        assert got is dest and torch.equal(dest, o) and torch.equal(got_lse, lse)
        assert kernels.flash_attn(q, k, v, out=dest, **kw) is dest
    for accumulate in (False, True):
        for which in range(2):  # contiguous row slices, then strided views
            dests = [_destinations(t.shape, F64, 2 + i)[which] for i, t in enumerate((q, k, v))]
            before = [d.clone() for d in dests]
            got = flash_attn_backward(do, q, k, v, o, lse, **kw, dq=dests[0], dk=dests[1], dv=dests[2],
                                              accumulate=accumulate)
            for i, (name, d, b, p) in enumerate(zip(("dq", "dk", "dv"), dests, before, plain)):
                want = b + p if accumulate and i else p
                assert got[i] is d and torch.equal(d, want), (name, accumulate, which)
    # some destinations given, the others returned fresh
    dq, dk, dv = flash_attn_backward(do, q, k, v, o, lse, **kw, dk=torch.zeros_like(k), accumulate=True)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), plain))


def test_flash_attn_destination_errors_name_the_argument():
    q = torch.zeros(1, 5, 2, 4, dtype=F64)
    with pytest.raises(ValueError, match="out= must have shape"):
        kernels.flash_attn(q, q, q, out=torch.zeros(1, 5, 2, 4))
    with pytest.raises(ValueError, match="dk= must have shape"):
        flash_attn_backward(q, q, q, q, q, torch.zeros(1, 2, 5, dtype=F64), dk=q[:, :4])
    with pytest.raises(RuntimeError, match="autograd"):
        kernels.flash_attn(q.clone().requires_grad_(), q, q, out=torch.zeros_like(q))


# ---------------------------------------------------------------- lightning_attn

def _lightning_brute(q, k, v, log_decay, scale, bounds, init):
    """Closed form per document: decay matrix over the whole document, initial state read out
    with exp(log_decay * (t + 1)); final state sum_s exp(log_decay * (L-1-s)) k_s^T v_s + decayed init."""
    outs, finals = [], []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        L = e - s
        t = torch.arange(L, dtype=F64)
        lam = log_decay[:, None, None]
        diff = t[:, None] - t[None, :]
        decay = torch.where(diff >= 0, torch.exp(lam * diff.clamp(min=0)), 0.0)  # [H, L, L]
        qd, kd, vd = q[0, s:e], k[0, s:e], v[0, s:e]
        o = torch.einsum("thd,shd,hts,she->the", qd, kd, decay, vd)
        o = o + torch.einsum("thd,ht,hde->the", qd, torch.exp(log_decay[:, None] * (t + 1)), init[i])
        last = torch.exp(log_decay[:, None] * (L - 1 - t))  # [H, L]
        final = torch.einsum("shd,hs,she->hde", kd, last, vd) + torch.exp(log_decay * L)[:, None, None] * init[i]
        outs.append(scale * o)
        finals.append(final)
    return torch.cat(outs)[None], torch.stack(finals)


@pytest.mark.parametrize("lengths", [[1], [37], [130], [1, 5, 64, 65, 200], [64, 128, 3]])
def test_lightning_chunked_matches_brute_force_and_recurrence(lengths):
    g = _gen(sum(lengths))
    S, H, Dk, Dv = sum(lengths), 3, 6, 5
    q, k = _randn(g, 1, S, H, Dk), _randn(g, 1, S, H, Dk)
    v = _randn(g, 1, S, H, Dv)
    log_decay = torch.tensor([0.0, -0.05, -3.0], dtype=F64)  # no decay, slow, fast
    init = _randn(g, len(lengths), H, Dk, Dv)
    cu = _cu(lengths)
    o, final = kernels.lightning_attn(q, k, v, log_decay, initial_state=init, output_final_state=True,
                                      cu_seqlens=cu)
    ref_o, ref_final = _lightning_brute(q, k, v, log_decay, Dk ** -0.5, cu.tolist(), init)
    torch.testing.assert_close(o, ref_o)
    torch.testing.assert_close(final, ref_final)
    rec_o, rec_final = lightning_attn_recurrent(q, k, v, log_decay, initial_state=init, output_final_state=True,
                                                cu_seqlens=cu)
    torch.testing.assert_close(o, rec_o)
    torch.testing.assert_close(final, rec_final)


def test_lightning_batched_without_cu_seqlens_and_no_state():
    g = _gen(5)
    q, k, v = _randn(g, 2, 130, 2, 4), _randn(g, 2, 130, 2, 4), _randn(g, 2, 130, 2, 7)
    log_decay = torch.tensor([-0.01, -0.5], dtype=F64)
    o, final = kernels.lightning_attn(q, k, v, log_decay, scale=0.7)
    assert final is None
    rec, _ = lightning_attn_recurrent(q, k, v, log_decay, scale=0.7)
    torch.testing.assert_close(o, rec)
    _, final = kernels.lightning_attn(q, k, v, log_decay, output_final_state=True)
    assert final.shape == (2, 2, 4, 7)


def test_lightning_long_document_with_strong_decay_stays_finite():
    g = _gen(6)
    q, k, v = (_randn(g, 1, 1000, 1, 4, dtype=torch.float32) for _ in range(3))
    o, final = kernels.lightning_attn(q, k, v, torch.tensor([-20.0]), output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    # with decay exp(-20) each token only sees itself
    torch.testing.assert_close(o, 0.5 * (q * k).sum(-1, keepdim=True) * v, atol=1e-5, rtol=1e-5)


def test_lightning_split_and_chain_state_reproduces_whole():
    """LASP-2 runs pieces of a sequence independently and chains their states."""
    g = _gen(7)
    S, H = 200, 2
    q, k, v = _randn(g, 1, S, H, 8), _randn(g, 1, S, H, 8), _randn(g, 1, S, H, 3)
    log_decay = torch.tensor([-0.02, -0.3], dtype=F64)
    init = _randn(g, 1, H, 8, 3)
    whole, whole_final = kernels.lightning_attn(q, k, v, log_decay, initial_state=init, output_final_state=True)
    for cut in (1, 64, 77, 199):
        a, mid = kernels.lightning_attn(q[:, :cut], k[:, :cut], v[:, :cut], log_decay, initial_state=init,
                                        output_final_state=True)
        b, end = kernels.lightning_attn(q[:, cut:], k[:, cut:], v[:, cut:], log_decay, initial_state=mid,
                                        output_final_state=True)
        torch.testing.assert_close(torch.cat([a, b], dim=1), whole)
        torch.testing.assert_close(end, whole_final)


def test_lightning_gradients_match_recurrence_including_initial_state():
    g = _gen(8)
    lengths = [3, 70, 1]
    S, H = sum(lengths), 2
    inputs = [_randn(g, 1, S, H, 4), _randn(g, 1, S, H, 4), _randn(g, 1, S, H, 5), _randn(g, 3, H, 4, 5)]
    log_decay = torch.tensor([-0.1, -1.0], dtype=F64)
    go, gf = _randn(g, 1, S, H, 5), _randn(g, 3, H, 4, 5)

    def grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        o, final = fn(*leaves[:3], log_decay, initial_state=leaves[3], output_final_state=True, cu_seqlens=_cu(lengths))
        ((o * go).sum() + (final * gf).sum()).backward()
        return [t.grad for t in leaves]

    for a, b in zip(grads(lightning_attn_reference), grads(lightning_attn_recurrent)):
        torch.testing.assert_close(a, b)
    small = [_randn(g, 1, 9, 1, 2).requires_grad_() for _ in range(3)] + [_randn(g, 2, 1, 2, 2).requires_grad_()]
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: lightning_attn_reference(q, k, v, torch.tensor([-0.4], dtype=F64), initial_state=s,
                                                    output_final_state=True, cu_seqlens=_cu([4, 5])), small)


def test_lightning_bf16_returns_input_dtype_and_fp32_state():
    g = _gen(9)
    q, k, v = (_randn(g, 1, 65, 2, 4, dtype=torch.bfloat16) for _ in range(3))
    o, final = kernels.lightning_attn(q, k, v, torch.tensor([-0.1, -0.2]), output_final_state=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32


# ---------------------------------------------------------------- norm and rope

@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    g = _gen(10)
    x, w = _randn(g, 2, 37, 3, 24, dtype=dtype), _randn(g, 24, dtype=dtype)
    y = kernels.rms_norm(x, w, 1e-5)
    xd = x.double()
    ref = xd / torch.sqrt((xd * xd).sum(-1, keepdim=True) / 24 + 1e-5) * w.double()
    assert y.dtype == dtype
    tol = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.double(), ref.to(dtype).double(), atol=tol, rtol=tol)


def test_rotary_cos_sin_and_apply_match_complex_rotation():
    positions = torch.tensor([0, 1, 2, 0, 1, 7, 100000])  # per-document resets and a far position
    D, theta = 8, 500000.0
    cos, sin = kernels.rotary_cos_sin(positions, D, theta, dtype=F64)
    assert cos.shape == (7, 4)
    for i, p in enumerate(positions.tolist()):
        for j in range(D // 2):
            angle = p * theta ** (-2 * j / D)
            assert math.isclose(cos[i, j].item(), math.cos(angle), abs_tol=1e-12)
            assert math.isclose(sin[i, j].item(), math.sin(angle), abs_tol=1e-12)
    g = _gen(11)
    x = _randn(g, 2, 7, 3, D)
    y = kernels.apply_rotary(x, cos, sin)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], dim=-1))
    # per-batch tables [B, S, D/2]
    cos_b, sin_b = kernels.rotary_cos_sin(torch.stack([positions, positions.flip(0)]), D, theta, dtype=F64)
    yb = kernels.apply_rotary(x, cos_b, sin_b)
    torch.testing.assert_close(yb[0], y[0])
    torch.testing.assert_close(yb[1], kernels.apply_rotary(x[1:], cos.flip(0), sin.flip(0))[0])
    # rotation preserves norms, and the fp32 path returns x's dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    assert kernels.apply_rotary(x.bfloat16(), cos, sin).dtype == torch.bfloat16


# ---------------------------------------------------------------- fused linear cross-entropy

@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_fused_linear_cross_entropy_matches_f_cross_entropy(chunk_size, weight_grad):
    g = _gen(12)
    h = _randn(g, 3, 17, 10).requires_grad_()
    w = _randn(g, 29, 10).requires_grad_(weight_grad)
    t = torch.randint(0, 29, (3, 17), generator=g)
    t[0, :4] = -100
    t[2, 16] = -100
    loss = kernels.fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size)
    (loss * 2.5).backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_(weight_grad)
    ref = F.cross_entropy((h2 @ w2.T).reshape(-1, 29), t.reshape(-1), reduction="sum")
    (ref * 2.5).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, h2.grad)
    assert (w.grad is None) == (not weight_grad)
    if weight_grad:
        torch.testing.assert_close(w.grad, w2.grad)


def test_fused_linear_cross_entropy_edge_cases():
    g = _gen(13)
    h, w = _randn(g, 5, 4, dtype=torch.float32).requires_grad_(), _randn(g, 9, 4, dtype=torch.float32)
    loss = kernels.fused_linear_cross_entropy(h, w, torch.full((5,), -1), ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and (h.grad == 0).all()
    with torch.no_grad():
        assert kernels.fused_linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long)) > 0
    hb, wb = h.detach().bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    t = torch.randint(0, 9, (5,), generator=g)
    loss = fused_linear_cross_entropy_reference(hb, wb, t, chunk_size=2)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((hb @ wb.T).double(), t, reduction="sum")  # CPU bf16 matmul rounds the logits
    torch.testing.assert_close(loss.double(), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- dispatch

def test_dispatch_is_reference_on_cpu(monkeypatch):
    x = torch.zeros(1, 4, 2, 8)
    for op in dispatch.OPS:
        assert kernels.backend(op, x, x, x) == "reference"
    monkeypatch.setenv("SEQPAR_KERNELS", "reference")
    assert kernels.backend("flash_attn", x, x, x) == "reference"
    monkeypatch.setenv("SEQPAR_KERNELS", "fastest")
    with pytest.raises(ValueError, match="SEQPAR_KERNELS"):
        kernels.backend("rms_norm", x)
    with pytest.raises(ValueError, match="unknown kernel op"):
        kernels.backend("softmax", x)


# ---------------------------------------------------------------- CUDA fast paths vs references

@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["dense", "packed", "varlen_qk", "one_document"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_flash_attn_fast_paths_match_reference(layout, dtype):
    g = _gen(20)
    lq = [1, 5, 64, 65, 200, 1000, 4, 3] if layout != "one_document" else [1342]
    lk = lq if layout != "varlen_qk" else [3, 5, 100, 65, 300, 1000, 1, 0]  # Lq < Lk, Lq > Lk, no keys
    B = 2 if layout == "dense" else 1
    q = _randn(g, B, sum(lq), 8, 64, dtype=dtype).cuda().requires_grad_()
    k, v = (_randn(g, B, sum(lk), 2, 64, dtype=dtype).cuda().requires_grad_() for _ in range(2))
    docs = {"dense": {}, "packed": {"cu_seqlens": _cu(lq).cuda()}, "one_document": {"cu_seqlens": _cu(lq).cuda()},
            "varlen_qk": {"cu_seqlens_q": _cu(lq).cuda(), "cu_seqlens_k": _cu(lk).cuda()}}[layout]
    # packed documents: the split (long documents through cuDNN, the rest through seqpar's Triton
    # kernel; dispatch.SPLIT_FASTER); distinct query and key boundaries: the Triton kernel, both
    # measured faster than torch's varlen flash (dispatch.TRITON_FASTER)
    want = {"dense": "sdpa", "one_document": "sdpa", "packed": "split", "varlen_qk": "triton"}[layout]
    assert kernels.backend("flash_attn", q, k, v, **docs) == want
    out = kernels.flash_attn(q, k, v, **docs)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = flash_attn_reference(q, k, v, **docs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    # a dense lse comes from torch's aten flash/cuDNN ops unless autograd must go through it, which
    # only the Triton kernel's lse has (tests/test_ring.py); with boundaries (ring steps of packed
    # rows, disagg servers, one task included) the split's lse form takes it (dispatch.SPLIT_FASTER)
    assert kernels.backend("flash_attn", q, k, v, return_lse=True, needs_grad=True, **docs) == "triton"
    lse_backend = kernels.backend("flash_attn", q, k, v, return_lse=True, **docs)
    assert lse_backend.startswith("aten_") if layout == "dense" else lse_backend == "split", lse_backend


@pytest.mark.gpu
def test_cuda_rms_norm_matches_reference():
    from seqpar.kernels.norm_rope.reference import rms_norm_reference
    x = torch.randn(4, 300, 8, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(128, device="cuda", dtype=torch.float32)
    assert kernels.backend("rms_norm", x, w) == "triton"  # torch's own op past 8192 wide (test_fused_triton.py)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
def test_cuda_fused_cross_entropy_under_autocast():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(3000, 256, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(5000, 256, device="cuda", generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, 5000, (3000,), device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = kernels.fused_linear_cross_entropy(h, w, t, chunk_size=1024)
    loss.backward()
    # ground truth: fp64 on the bf16-rounded inputs that autocast feeds the matmuls
    hd, wd = h.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, t, reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-2)
    for ours, exact in ((h.grad, hd.grad), (w.grad, wd.grad)):
        assert ((ours.double() - exact).norm() / exact.norm()).item() < 1e-2


def test_triton_autotuners_keep_their_picks_on_disk():
    """Every Triton kernel tunes through kernels/autotune.py, which keeps the picks in Triton's
    cache (a restart or the next run skips the timing; SEQPAR_TUNE_CACHE=0 times afresh) and
    times long configs once."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    code = ("import inspect, triton, triton.runtime.autotuner as at\n"
            "from seqpar.kernels.flash_attn import triton as f\n"
            "from seqpar.kernels.lightning_attn import triton as l\n"
            "from seqpar.kernels.norm_rope import triton as n\n"
            "from seqpar.kernels.autotune import Tuned, bench\n"
            "kernels = [v for m in (f, l, n) for v in vars(m).values()]\n"
            "assert not [v for v in kernels if isinstance(v, at.Autotuner)], 'every tuner launches through Tuned'\n"
            "tuners = [v.tuner for v in kernels if isinstance(v, Tuned)]\n"
            "assert len(tuners) >= 8, len(tuners)\n"
            "assert all(t.do_bench is bench for t in tuners), 'long configs timed once'\n"
            "print(sorted({t.cache_results for t in tuners}),"
            " 'cache_results' in inspect.signature(triton.autotune).parameters)\n")
    for env, want in (({}, "[True] True"), ({"SEQPAR_TUNE_CACHE": "0"}, "[False] True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "TRITON_INTERPRET": "0", **env})
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == want


def test_tuned_launches_skip_the_autotuner_once_a_key_is_tuned():
    """`Tuned` takes a key's pick from the autotuner's first launch of it and launches later ones
    with it; its key is the autotuner's own (else the autotuner, finding no pick under it, would
    try to time the configs, which needs a GPU, and fail here)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from seqpar.kernels.autotune import autotune

    small, large = triton.Config({"BLOCK": 16}, num_warps=4), triton.Config({"BLOCK": 32}, num_warps=8)

    @autotune(configs=[small, large], key=["N"])
    @triton.jit
    def kernel(x_ptr, y_ptr, n, N: tl.constexpr, BLOCK: tl.constexpr):
        pass

    tuner, launched, through_tuner = kernel.tuner, [], []
    tuner.fn.run = lambda *args, **kw: launched.append(kw["BLOCK"])  # no launch: what it would launch with
    tuner_run = tuner.run
    tuner.run = lambda *args, **kw: through_tuner.append(kw["N"]) or tuner_run(*args, **kw)
    x, y, h = torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.float16)
    launch = {"grid": (1,), "warmup": False}
    tuner.cache[kernel._key((x, y, 7), {"N": 64, **launch})] = large  # as if tuned: the autotuner's key
    tuner.cache[kernel._key((h, y, 7), {"N": 64, **launch})] = small
    for inputs, n in (((x, y, 7), 64), ((x, y, 9), 64), ((h, y, 7), 64), ((x, y, 7), 64)):
        kernel[(1,)](*inputs, N=n)
    assert launched == [32, 32, 16, 32] and through_tuner == [64, 64]  # a new dtype is a new key
    kernel.configs = [small]  # set on the autotuner; the picks are forgotten
    kernel[(1,)](x, y, 7, N=64)
    assert tuner.configs == [small] and launched[-1] == 16 and through_tuner == [64, 64, 64]


def test_jit_stats_time_compiles_and_tuning_runs_apart(monkeypatch):
    """kernels/jit_stats.py: Triton's compile hooks (chained after any set before) count compiles,
    a tuning run counts once with the compiles inside it, `take` hands out the step's numbers and
    the slow events, then starts afresh."""
    pytest.importorskip("triton")
    from triton import knobs

    from seqpar.kernels import jit_stats

    seen = []
    monkeypatch.setattr(knobs.runtime, "jit_cache_hook", lambda **kw: seen.append(("before", kw["repr"])))
    monkeypatch.setattr(knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append(("after", kw["repr"])))
    monkeypatch.setattr(jit_stats, "_installed", [False])
    monkeypatch.setattr(jit_stats, "SLOW_S", 0.0)
    jit_stats.take()
    assert jit_stats.install()
    clock = iter([10.0, 10.5, 20.0, 20.25, 21.0, 22.0])
    monkeypatch.setattr(jit_stats.time, "perf_counter", lambda: next(clock))
    knobs.runtime.jit_cache_hook(repr="_merge[...]")  # a compile outside tuning: 0.5 s
    knobs.runtime.jit_post_compile_hook(repr="_merge[...]")
    with jit_stats.tuning("_attn_fwd", (64, True)):  # 20 -> 22 s, its compile (0.25 s) inside
        knobs.runtime.jit_cache_hook(repr="_attn_fwd[...]")
        knobs.runtime.jit_post_compile_hook(repr="_attn_fwd[...]")
    assert seen == [("before", "_merge[...]"), ("after", "_merge[...]"), ("before", "_attn_fwd[...]"),
                    ("after", "_attn_fwd[...]")]
    metrics, slow = jit_stats.take()
    assert metrics == {"jit_compile_s": 0.5, "jit_tune_s": 2.0, "jit_compiles": 1, "jit_tunes": 1}
    assert slow == [("compile", "_merge[...]", 0.5), ("tune", "_attn_fwd key=(64, True)", 2.0)]
    assert jit_stats.take() == ({"jit_compile_s": 0.0, "jit_tune_s": 0.0, "jit_compiles": 0, "jit_tunes": 0}, [])


class _Compiled:
    """Stands in for a compiled Triton kernel: records its launches."""

    def __init__(self, options):
        self.options, self.launches = options, []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


def test_launch_reuses_a_compiled_kernel_only_under_the_same_specialisation():
    """`Launch` goes through Triton for every key it has not seen, and its key changes with
    everything Triton specialises on; a seen one launches the compiled kernel with every argument."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from seqpar.kernels import launch as launch_module
    from seqpar.kernels.launch import Launch

    @triton.jit(do_not_specialize=["n"])
    def kernel(x_ptr, y_ptr, n, m, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
        pass

    compiled, device = [], [0]

    def through_triton(*args, grid, warmup, **kwargs):
        compiled.append(_Compiled(kwargs))
        return compiled[-1]

    kernel.run = through_triton
    launch = Launch(kernel, device=lambda: device[0])
    x, y = torch.zeros(64), torch.zeros(64)
    base = ((x, y, 100, 32, 1.0), {"BLOCK": 16})
    launch[(4,)](*base[0], **base[1])
    launch[(4,)](*base[0], **base[1])
    launch[(4, 2)](x, y, 7, 32, 1.0, BLOCK=16)  # n's value does not specialise: the same kernel
    assert len(compiled) == 1
    assert compiled[0].launches == [((4, 1, 1), (x, y, 100, 32, 1.0, 16, False)),
                                    ((4, 2, 1), (x, y, 7, 32, 1.0, 16, False))]
    changes = [((x[1:], y, 100, 32, 1.0), {"BLOCK": 16}),  # an address off 16 bytes
               ((x.double(), y, 100, 32, 1.0), {"BLOCK": 16}),  # a dtype
               ((x, y, 100, 33, 1.0), {"BLOCK": 16}),  # an integer's value
               ((x, y, 2 ** 40, 32, 1.0), {"BLOCK": 16}),  # a do-not-specialise integer's width
               ((x, y, 100, 32, 1), {"BLOCK": 16}),  # an int where a float was (1 == 1.0)
               ((x, y, 100, 32, 1.0), {"BLOCK": 32}),  # a constexpr
               ((x, y, 100, 32, 1.0), {"BLOCK": 16, "num_warps": 8})]  # a launch option
    for n, (args, kwargs) in enumerate(changes, start=2):
        launch[(4,)](*args, **kwargs)
        assert len(compiled) == n, (n, args, kwargs)
        launch[(4,)](*args, **kwargs)
        assert len(compiled) == n and compiled[-1].launches, (n, args, kwargs)
    device[0] = 1  # another device
    launch[(4,)](*base[0], **base[1])
    assert len(compiled) == len(changes) + 2
    # always through Triton: a constexpr passed by position, a grid reading a positional argument
    for args, kwargs, grid in (((x, y, 100, 32, 1.0, 16), {}, (4,)), (base[0], base[1], lambda meta: (meta["n"],))):
        before = len(compiled)
        launch[grid](*args, **kwargs)
        launch[grid](*args, **kwargs)
        assert len(compiled) == before + 2
    grid = lambda meta: (meta["BLOCK"] * 2,)  # noqa: E731  (reads a keyword argument: fine)
    launch[grid](x, y, 5, 64, 1.0, BLOCK=8)
    launch[grid](x, y, 5, 64, 1.0, BLOCK=8)
    assert compiled[-1].launches == [((16, 1, 1), (x, y, 5, 64, 1.0, 8, False))]
    for m in range(launch_module.LIMIT + 1):  # a bounded memory
        launch[(1,)](x, y, 5, m, 1.0, BLOCK=8)
    assert len(launch._known) <= launch_module.LIMIT


def test_tuned_launches_remember_the_compiled_kernel_of_their_pick():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from seqpar.kernels.autotune import autotune

    small, large = triton.Config({"BLOCK": 16}, num_warps=4), triton.Config({"BLOCK": 32}, num_warps=8)

    @autotune(configs=[small, large], key=["N"])
    @triton.jit
    def kernel(x_ptr, n, N: tl.constexpr, BLOCK: tl.constexpr):
        pass

    compiled = []
    kernel.tuner.fn.run = lambda *args, grid, warmup, **kw: compiled.append(_Compiled(kw)) or compiled[-1]
    x = torch.zeros(4)
    kernel.tuner.cache[kernel._key((x, 7), {"N": 64})] = large
    grid = lambda meta: (meta["BLOCK"],)  # noqa: E731
    for _ in range(3):
        kernel[grid](x, 7, N=64)
    assert len(compiled) == 1 and compiled[0].options["BLOCK"] == 32 and compiled[0].options["num_warps"] == 8
    assert compiled[0].launches == [((32, 1, 1), (x, 7, 64, 32))] * 2
    kernel.configs = [small]  # forgets the picks and the kernels
    kernel.tuner.cache[kernel._key((x, 7), {"N": 64})] = small
    kernel[grid](x, 7, N=64)
    assert len(compiled) == 2 and compiled[1].options["BLOCK"] == 16


def test_autotune_times_long_configs_once():
    pytest.importorskip("triton")
    from seqpar.kernels.autotune import LONG_MS, bench

    for ms, quantiles in ((LONG_MS * 10, (0.5, 0.2, 0.8)), (LONG_MS, None), (LONG_MS / 10, (0.5,))):
        calls, full = [], []
        got = bench(lambda: calls.append(1), quantiles, time_once=lambda fn: fn() or ms,
                    full=lambda fn, quantiles: full.append(quantiles) or "triton's")
        if ms >= LONG_MS:  # one untimed run (compiles), one timed: Triton's do_bench never runs
            assert len(calls) == 2 and not full and got == ([ms] * len(quantiles) if quantiles else ms)
        else:
            assert got == "triton's" and full == [quantiles]
