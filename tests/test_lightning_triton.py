"""The Triton lightning-attention kernel against the float64 reference: on CPU through Triton's
interpreter (small shapes, a few seconds each), and on CUDA (`gpu`) in bf16/fp16 at real sizes.

Every case checks the forward (o, final state) and the gradients into q, k, v and the initial
state, with a loss that uses the final state too, as LASP-2 does."""

import pytest
import torch

from seqpar import kernels
from seqpar.kernels.lightning_attn.reference import lightning_attn_reference
from tests.triton_interpreter import interp_only, run_interpreter_tests

pytest.importorskip("triton")

F64 = torch.float64




def test_triton_interpreter_subprocess():
    run_interpreter_tests(__file__)


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _case(lengths, B, H, Dk, Dv, log_decay, init, seed, device="cpu"):
    """Inputs in float64; `lengths` packs documents into one row (B = 1); an int means B rows of it."""
    g = torch.Generator(device=device).manual_seed(seed)
    S = sum(lengths) if isinstance(lengths, list) else lengths
    n = len(lengths) if isinstance(lengths, list) else B
    r = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=F64)  # noqa: E731
    return dict(q=r(B, S, H, Dk), k=r(B, S, H, Dk), v=r(B, S, H, Dv),
                log_decay=torch.tensor(log_decay, dtype=F64, device=device),
                init=r(n, H, Dk, Dv) if init else None, do=r(B, S, H, Dv), dfinal=r(n, H, Dk, Dv),
                cu=_cu(lengths, device) if isinstance(lengths, list) else None)


def _run(fn, c, dtype, use_o=True, **kw):
    """o, final, and the gradients of <o, do> + <final, dfinal> into q, k, v, init (fp64 copies)."""
    q, k, v = (c[n].to(dtype).requires_grad_() for n in "qkv")
    init = None if c["init"] is None else c["init"].clone().requires_grad_()
    o, final = fn(q, k, v, c["log_decay"], initial_state=init, output_final_state=True,
                  cu_seqlens=c["cu"], **kw)
    loss = (final.double() * c["dfinal"]).sum()
    if use_o:
        loss = loss + (o.double() * c["do"]).sum()
    leaves = [t for t in (q, k, v, init) if t is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return {"o": o, "final": final, **dict(zip(["dq", "dk", "dv", "dinit"], grads))}


def _check(ours, ref, tol):
    for name, exact in ref.items():
        got = ours[name].double()
        assert got.shape == exact.shape, name
        err = ((got - exact).norm() / exact.norm().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------- CPU, Triton interpreter

@interp_only
def test_interp_segment_table_covers_each_document_in_order():
    from seqpar.kernels.lightning_attn import triton as interpreted

    lengths = [1, 0, 130, 64, 65, 3]
    segs, doc_seg, n_docs, n_max, n_bounds = interpreted.segment_table(_cu(lengths), 1, sum(lengths), 64, "cpu")
    assert n_docs == 6 and n_max == sum(lengths) // 64 + 6 and n_bounds == sum(lengths) // 64
    # (start, end, document, boundary before, boundary after): boundaries only inside documents
    # (start, end, document, boundary before, boundary after, tokens of the document before, after)
    expect = [(0, 1, 0, -1, -1, 0, 0), (1, 65, 2, -1, 0, 0, 66), (65, 129, 2, 0, 1, 64, 2),
              (129, 131, 2, 1, -1, 128, 0), (131, 195, 3, -1, -1, 0, 0), (195, 259, 4, -1, 2, 0, 1),
              (259, 260, 4, 2, -1, 64, 0), (260, 263, 5, -1, -1, 0, 0)]
    assert [tuple(s) for s in segs.tolist()[:len(expect)]] == expect
    spare = segs[len(expect):]
    assert (spare[:, :2] == 0).all() and (spare[:, 3:5] == -1).all() and (spare[:, 5:] == 0).all()  # empty
    assert doc_seg.tolist() == [0, 1, 1, 4, 5, 7, 8]
    dense, doc_seg, n_docs, _, n_bounds = interpreted.segment_table(None, 3, 100, 64, "cpu")
    assert n_docs == 3 and doc_seg.tolist() == [0, 2, 4, 6] and n_bounds == 4
    assert [tuple(s[:5]) for s in dense.tolist()[:6]] == [(0, 64, 0, -1, 0), (64, 100, 0, 0, -1), (100, 164, 1, -1, 1),
                                                          (164, 200, 1, 1, -1), (200, 264, 2, -1, 2), (264, 300, 2, 2, -1)]
    # many short documents need no state storage: boundaries are bounded by tokens / seg_len
    *_, n_bounds = interpreted.segment_table(_cu([3] * 1000), 1, 3000, 256, "cpu")
    assert n_bounds == 11


@interp_only
@pytest.mark.parametrize("seg_len", [64, 128])
def test_interp_packed_documents_with_states(seg_len):
    from seqpar.kernels.lightning_attn import triton as interpreted

    # length-1 documents, an empty one, lengths around the chunk size, one spanning several segments
    c = _case([1, 70, 0, 5, 130, 64, 1], 1, 2, 16, 32, [0.0, -0.3], init=True, seed=seg_len)
    ours = _run(interpreted.lightning_attn_triton, c, torch.float32, seg_len=seg_len)
    _check(ours, _run(lightning_attn_reference, c, F64), 1e-5)


@interp_only
def test_interp_batch_rows_odd_head_dims_strong_decay():
    from seqpar.kernels.lightning_attn import triton as interpreted

    # B rows without cu_seqlens; Dk = 24 pads to a 32-wide block; exp(-8 * 63) underflows to 0
    c = _case(97, 2, 3, 24, 16, [0.0, -0.05, -8.0], init=False, seed=1)
    ours = _run(interpreted.lightning_attn_triton, c, torch.float32, seg_len=64)
    _check(ours, _run(lightning_attn_reference, c, F64), 1e-5)


@interp_only
def test_interp_tma_loads_equal_the_reference(monkeypatch):
    from seqpar.kernels.lightning_attn import triton as interpreted
    from seqpar.kernels.tma import use_tma

    # chunks through TMA descriptors over each segment: past its end, and past Dk = 24 in the 32-wide
    # block, they read zeros
    monkeypatch.setenv("SEQPAR_TMA", "1")
    c = _case([1, 70, 0, 5, 130, 64, 1], 1, 2, 24, 16, [0.0, -0.3], init=True, seed=5)
    assert use_tma(c["q"], c["k"], c["v"])
    ours = _run(interpreted.lightning_attn_triton, c, torch.float32, seg_len=64)
    _check(ours, _run(lightning_attn_reference, c, F64), 1e-5)


@interp_only
@pytest.mark.parametrize("seg_len,tma", [(64, "0"), (128, "1")])
def test_interp_chained_boundary_states_equal_the_reference(monkeypatch, seg_len, tma):
    """SEQPAR_LIGHTNING_CHAIN=1: the forward's and the dv pass's output launches make the boundary
    states themselves (kernels 1-2 never run), segments taken in the direction of travel; an empty
    document's final state and d initial_state still come out."""
    from seqpar.kernels.lightning_attn import triton as interpreted

    def not_called(*args, **kwargs):
        raise AssertionError("kernels 1-2 ran")

    monkeypatch.setenv("SEQPAR_LIGHTNING_CHAIN", "1")
    monkeypatch.setenv("SEQPAR_TMA", tma)
    monkeypatch.setattr(interpreted, "_boundary_states", not_called)
    c = _case([1, 70, 0, 5, 130, 64, 1], 1, 2, 16, 32, [0.0, -0.3], init=True, seed=11 + seg_len)
    _check(_run(interpreted.lightning_attn_triton, c, torch.float32, seg_len=seg_len),
           _run(lightning_attn_reference, c, F64), 1e-5)
    c = _case(200, 2, 3, 24, 16, [-0.1, 0.0, -2.0], init=False, seed=3)  # rows of several segments, no documents
    _check(_run(interpreted.lightning_attn_triton, c, torch.float32, seg_len=seg_len),
           _run(lightning_attn_reference, c, F64), 1e-5)


@interp_only
def test_interp_only_the_final_state_is_used():
    from seqpar.kernels.lightning_attn import triton as interpreted

    # LASP-2 differentiates through the final state alone on some ranks: k, v, init get gradients
    c = _case([40, 90], 1, 2, 16, 16, [-0.1, 0.0], init=True, seed=2)
    ours = _run(interpreted.lightning_attn_triton, c, torch.float32, use_o=False, seg_len=64)
    ref = _run(lightning_attn_reference, c, F64, use_o=False)
    assert (ours["dq"] == 0).all()
    _check({n: ours[n] for n in ("final", "dk", "dv", "dinit")}, {n: ref[n] for n in ("final", "dk", "dv", "dinit")},
           1e-5)


@interp_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_interp_half_inputs_and_defaults(dtype):
    from seqpar.kernels.lightning_attn import triton as interpreted

    # bf16 loads and stores (fp16 through bf16), default scale and segment length, no states
    c = _case([3, 100], 1, 2, 16, 16, [-0.2, -0.01], init=False, seed=3)
    q, k, v = (c[n].to(dtype).requires_grad_() for n in "qkv")
    o, final = interpreted.lightning_attn_triton(q, k, v, c["log_decay"], cu_seqlens=c["cu"])
    assert o.dtype == dtype and final is None
    o.float().square().sum().backward()
    assert q.grad.dtype == dtype and k.grad.dtype == dtype and v.grad.dtype == dtype
    ref, _ = lightning_attn_reference(*(t.detach().double() for t in (q, k, v)), c["log_decay"], cu_seqlens=c["cu"])
    assert ((o.double() - ref).norm() / ref.norm()).item() < 1e-2


class _Mix:
    """A linear map of the documents' own states and its adjoint, standing in for LASP-2's scan:
    each document enters with a fixed mix of every document's exit state (counted calls)."""

    def __init__(self, n, seed):
        self.w = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64)
        self.calls = []

    def forward(self, own):
        self.calls.append("forward")
        return _Done(torch.einsum("ij,jhde->ihde", self.w.to(own), own))

    def backward(self, d_initial):
        self.calls.append("backward")
        return _Done(torch.einsum("ji,jhde->ihde", self.w.to(d_initial), d_initial))


class _Done:
    def __init__(self, x):
        self.x = x

    def wait(self):
        return self.x


def _run_exchange(fn, c, dtype, seed, **kw):
    q, k, v = (c[n].to(dtype).requires_grad_() for n in "qkv")
    mix = _Mix(c["dfinal"].shape[0], seed)
    o, final = fn(q, k, v, c["log_decay"], cu_seqlens=c["cu"], exchange=mix, **kw)
    assert final is None
    grads = torch.autograd.grad((o.double() * c["do"]).sum(), (q, k, v))
    assert mix.calls == ["forward", "backward"]
    return {"o": o, **dict(zip(["dq", "dk", "dv"], grads))}


@interp_only
@pytest.mark.parametrize("seg_len", [64, 128])
def test_interp_exchange_hook(seg_len):
    """The kernel's exchange path (own states from zero, the map, the pass from its answer) equals
    the reference composed through autograd; documents of one segment, several, and empty ones."""
    from seqpar.kernels.lightning_attn import triton as interpreted

    c = _case([1, 70, 0, 5, 200, 64], 1, 2, 16, 32, [0.0, -0.3], init=False, seed=seg_len + 1)
    ours = _run_exchange(interpreted.lightning_attn_triton, c, torch.float32, seed=4, seg_len=seg_len)
    _check(ours, _run_exchange(kernels.lightning_attn, c, F64, seed=4), 1e-5)


def test_exchange_reference_is_the_composition():
    """On the reference: the exchange's map applied by hand to the own states gives the same output
    and gradients (float64), and an exchange with initial_state is refused."""
    c = _case([3, 40, 17], 1, 2, 8, 8, [-0.1, 0.0], init=False, seed=5)
    ours = _run_exchange(kernels.lightning_attn, c, F64, seed=6)
    q, k, v = (c[n].clone().requires_grad_() for n in "qkv")
    _, own = lightning_attn_reference(q, k, v, c["log_decay"], cu_seqlens=c["cu"], output_final_state=True)
    initial = torch.einsum("ij,jhde->ihde", _Mix(3, 6).w, own)
    o, _ = lightning_attn_reference(q, k, v, c["log_decay"], cu_seqlens=c["cu"], initial_state=initial)
    grads = torch.autograd.grad((o * c["do"]).sum(), (q, k, v))
    _check(ours, {"o": o, **dict(zip(["dq", "dk", "dv"], grads))}, 1e-12)
    with pytest.raises(ValueError, match="exchange"):
        kernels.lightning_attn(q, k, v, c["log_decay"], initial_state=initial, exchange=_Mix(3, 6))



def test_segment_length_fills_the_sms_with_the_longest_segments(monkeypatch):
    """The grid rule on 132 SMs (H100 / H200), 32 heads: a 64k call takes 16384-token segments (4 x 32
    segment-heads, within 7/8 of the SMs), rows of 16k then run as one segment each; fewer tokens take
    shorter segments, more never exceed MAX_SEGMENT; fewer heads take shorter ones."""
    from seqpar.kernels.lightning_attn import triton as lt

    monkeypatch.setattr(lt, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    picks = {tokens: lt.segment_length(tokens, 32, cuda) for tokens in (4096, 16384, 32768, 65536, 1 << 20)}
    assert picks == {4096: 1024, 16384: 4096, 32768: 8192, 65536: 16384, 1 << 20: lt.MAX_SEGMENT}
    assert lt.MAX_SEGMENT == 16384
    assert lt.segment_length(65536, 8, cuda) == 4096
    assert lt.segment_length(64, 32, cuda) == lt.MIN_SEGMENT


# ---------------------------------------------------------------- CUDA

GPU_CASES = {
    # name: (document lengths, or the length of B rows, B, H, Dk, Dv)
    "dense_rows": (4099, 2, 4, 128, 128),
    "packed_odd": ([1, 5, 64, 65, 200, 1000, 4, 3, 3001, 1, 1], 1, 8, 128, 128),
    "small_heads": ([777, 1, 2048, 63], 1, 4, 64, 32),
    "long_no_decay": ([40000, 1, 25535], 1, 2, 128, 128),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(GPU_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])  # fp32 goes to the reference (dispatch.py)
@pytest.mark.parametrize("chain", ["0", "1"])  # SEQPAR_LIGHTNING_CHAIN: boundary states inside the output passes
def test_cuda_lightning_attn_matches_fp64_reference(monkeypatch, case, dtype, chain):
    monkeypatch.setenv("SEQPAR_LIGHTNING_CHAIN", chain)
    lengths, B, H, Dk, Dv = GPU_CASES[case]
    decays = [0.0] * H if case == "long_no_decay" else (-torch.linspace(1, 8, H).exp2().reciprocal()).tolist()
    c = _case(lengths, B, H, Dk, Dv, decays, init=True, seed=7, device="cuda")
    q = c["q"].to(dtype)
    assert kernels.backend("lightning_attn", q, q, c["v"].to(dtype), c["log_decay"], c["init"]) == "triton"
    ours = _run(kernels.lightning_attn, c, dtype)
    # ground truth: fp64 on the inputs rounded to dtype, so the tolerance measures the kernel only
    rounded = {**c, **{n: c[n].to(dtype).double() for n in "qkv"}}
    ref = _run(lightning_attn_reference, rounded, F64)
    _check(ours, ref, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_exchange_hook_matches_fp64_reference():
    c = _case([1, 5, 3000, 64, 9000, 2], 1, 4, 128, 128, [-0.5, -0.01, -0.001, 0.0], init=False, seed=8,
              device="cuda")
    assert kernels.backend("lightning_attn", c["q"].bfloat16(), c["k"].bfloat16(), c["v"].bfloat16(),
                           c["log_decay"], None) == "triton"
    ours = _run_exchange(kernels.lightning_attn, c, torch.bfloat16, seed=9)
    rounded = {**c, **{n: c[n].bfloat16().double() for n in "qkv"}}
    _check(ours, _run_exchange(lightning_attn_reference_exchange, rounded, F64, seed=9), 1e-2)


def lightning_attn_reference_exchange(q, k, v, log_decay, **kw):
    """The reference path of `kernels.lightning_attn` whatever device the tensors are on."""
    import os
    from unittest import mock
    with mock.patch.dict(os.environ, {"SEQPAR_KERNELS": "reference"}):
        return kernels.lightning_attn(q, k, v, log_decay, **kw)
