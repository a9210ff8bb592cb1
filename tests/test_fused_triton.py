"""Triton RMSNorm, RoPE and fused linear + cross-entropy against their references.

CPU: every kernel through Triton's interpreter on small odd shapes, forward and backward, in one
subprocess (`TRITON_INTERPRET=1` must be set before triton is first imported); plus the references'
backward against float64 math. GPU (`gpu`): bf16 kernels against the float64 reference, rel. err
<= 1e-2 on several shapes, and the dispatch choosing them."""

import pytest
import torch
import torch.nn.functional as F

from seqpar import kernels
from seqpar.kernels.cross_entropy.reference import fused_linear_cross_entropy_reference
from seqpar.kernels.norm_rope.reference import apply_rotary_reference, rms_norm_reference, rotary_cos_sin
from tests.triton_interpreter import interp_only, run_interpreter_tests

pytest.importorskip("triton")

F64 = torch.float64
# The interpreter stores bf16 by truncation (it holds bf16 as uint16 for numpy), not by rounding:
# its bf16 results sit up to 2^-8 from the reference's, twice the rounding error.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def test_triton_interpreter_subprocess():
    run_interpreter_tests(__file__)


def _gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _grads(fn, inputs, dout):
    """fn(*inputs) and the gradients of <out, dout> into every input that requires grad."""
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out, *torch.autograd.grad(out, leaves, dout.to(out.dtype))]


def _check(ours, ref, tol, what):
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape, a.dtype, b.dtype)
        err = _rel(a, b)
        assert err <= tol, f"{what}, output {i}: relative error {err:.2e} > {tol:.0e}"


# ---------------------------------------------------------------- references vs float64 math

def test_rms_norm_reference_backward_matches_float64_formula():
    g = _gen(1)
    x = torch.randn(5, 3, 13, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(13, generator=g, dtype=F64, requires_grad=True)
    dy = torch.randn(5, 3, 13, generator=g, dtype=F64)
    y, dx, dw = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w), dy)
    r = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-5)
    xhat, gw = x.detach() * r, dy * w.detach()
    torch.testing.assert_close(dx, r * (gw - xhat * (gw * xhat).mean(-1, keepdim=True)))  # the kernel's formula
    torch.testing.assert_close(dw, (dy * xhat).sum((0, 1)))


def test_rotary_reference_backward_is_rotation_by_minus_angle():
    g = _gen(2)
    x = torch.randn(2, 7, 3, 10, generator=g, dtype=F64, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.randint(0, 1000, (2, 7), generator=g), 10, dtype=F64)
    dy = torch.randn(2, 7, 3, 10, generator=g, dtype=F64)
    _, dx = _grads(apply_rotary_reference, (x, cos, sin), dy)
    torch.testing.assert_close(dx, apply_rotary_reference(dy, cos, -sin))


# ---------------------------------------------------------------- CPU, Triton interpreter

@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7, 24), (1, 129), (2, 5, 3, 100), (67, 8)])
def test_interp_rms_norm(shape, dtype):
    from seqpar.kernels.norm_rope.triton import rms_norm_triton
    g = _gen(3)
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).requires_grad_()  # fp32 weight: grads come back fp32
    dy = torch.randn(*shape, generator=g)
    ours = _grads(lambda a, b: rms_norm_triton(a, b, 1e-5), (x, w), dy)
    ref = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w), dy)
    _check(ours, ref, TOL[dtype], f"rms_norm {shape} {dtype}")


@interp_only
def test_interp_rms_norm_strided_rows_and_16bit_weight():
    from seqpar.kernels.norm_rope.triton import rms_norm_triton
    g = _gen(4)
    x = torch.randn(11, 30, generator=g, requires_grad=True)
    xs = torch.randn(11, 60, generator=g, requires_grad=True)[:, :30]  # rows 60 apart: the kernel reads the view
    w = torch.randn(30, generator=g).bfloat16().requires_grad_()
    dy = torch.randn(11, 30, generator=g)
    for inp in (x, xs):
        ours = _grads(lambda a, b: rms_norm_triton(a, b, 1e-6), (inp, w), dy)
        ref = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6), (inp, w), dy)
        _check(ours, ref, 1e-5, "rms_norm strided / bf16 weight")


@interp_only
def test_interp_rms_norm_backward_variants():
    """Every backward loop variant (the benchmark's candidates) equals the reference; rows that
    do not fill the last block of a program, and fewer rows than programs."""
    from seqpar.kernels.norm_rope import triton as nr
    g = _gen(7)
    w = (1 + 0.5 * torch.randn(48, generator=g)).requires_grad_()
    for M in (150, 3):  # 150: 38 rows a program on CPU (4 programs), three 16-row blocks, the last short
        x = torch.randn(M, 48, generator=g).requires_grad_()
        dy = torch.randn(M, 48, generator=g)
        ref = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w), dy)
        for name in nr.RMS_BWD_VARIANTS:
            ours = _grads(lambda a, b: nr.rms_norm_triton(a, b, 1e-5, bwd_variant=name), (x, w), dy)
            _check(ours, ref, 1e-5, f"rms_norm backward variant {name}, {M} rows")
    with pytest.raises(ValueError, match="SEQPAR_RMS_BWD"):
        nr.rms_norm_triton(x, w, bwd_variant="nope")


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,S,H,D,per_batch", [(2, 5, 3, 12, False), (2, 9, 1, 6, True), (1, 3, 4, 128, True)])
def test_interp_rotary(B, S, H, D, per_batch, dtype):
    from seqpar.kernels.norm_rope.triton import apply_rotary_triton
    g = _gen(5)
    x = torch.randn(B, S, H, D, generator=g).to(dtype).requires_grad_()
    pos = torch.randint(0, 5000, (B, S) if per_batch else (S,), generator=g)
    cos, sin = rotary_cos_sin(pos, D)
    dy = torch.randn(B, S, H, D, generator=g)
    ours = _grads(apply_rotary_triton, (x, cos, sin), dy)
    ref = _grads(apply_rotary_reference, (x, cos, sin), dy)
    _check(ours, ref, TOL[dtype], f"rotary {(B, S, H, D)} per_batch={per_batch} {dtype}")


@interp_only
def test_interp_rotary_strided_heads_and_broadcast_table():
    """q and k as views into one fused projection (head stride != D), and a [1, D/2] table."""
    from seqpar.kernels.norm_rope.triton import apply_rotary_triton
    g = _gen(6)
    qk = torch.randn(2, 5, 3 + 2, 8, generator=g, requires_grad=True)
    q, k = qk[:, :, :3], qk[:, :, 3:]
    bhsd = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True).transpose(1, 2)  # [B, H, S, D] storage
    cos, sin = rotary_cos_sin(torch.arange(5), 8)
    dq, dk = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    for t, dy in ((q, dq), (k, dk), (bhsd, dq)):
        ours = _grads(lambda a: apply_rotary_triton(a, cos, sin), (t,), dy)
        ref = _grads(lambda a: apply_rotary_reference(a, cos, sin), (t,), dy)
        _check(ours, ref, 1e-6, "rotary strided")
    one = rotary_cos_sin(torch.tensor([17]), 8)
    torch.testing.assert_close(apply_rotary_triton(q.detach(), *one), apply_rotary_reference(q.detach(), *one))
    with pytest.raises(ValueError, match="half of head dim"):
        apply_rotary_triton(q, cos[:, :3], sin[:, :3])


def _ce_case(N, V, d, dtype, seed, ignored=(0,)):
    g = _gen(seed)
    h = torch.randn(N, d, generator=g).to(dtype)
    w = (torch.randn(V, d, generator=g) * 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    for i in ignored:
        t[i] = -100
    return h, w, t


def _ce_run(fn, h, w, t, weight_grad=True, scale=2.5, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)
    loss = fn(h, w, t, **kw)
    (loss * scale).backward()
    return [loss.detach(), h.grad] + ([w.grad] if weight_grad else [])


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,V,d,chunk", [(17, 29, 10, 7), (9, 300, 16, 4), (5, 5000, 8, 8)])
def test_interp_fused_cross_entropy(N, V, d, chunk, dtype):
    from seqpar.kernels.cross_entropy.triton import fused_linear_cross_entropy_triton
    h, w, t = _ce_case(N, V, d, dtype, seed=N, ignored=(0, N - 1))
    ours = _ce_run(fused_linear_cross_entropy_triton, h, w, t, chunk_size=chunk)
    ref = _ce_run(fused_linear_cross_entropy_reference, h, w, t, chunk_size=chunk)
    _check(ours, ref, TOL[dtype], f"cross-entropy N={N} V={V} {dtype}")


@interp_only
def test_interp_fused_cross_entropy_options():
    from seqpar.kernels.cross_entropy.triton import fused_linear_cross_entropy_triton as ours
    h, w, t = _ce_case(6, 33, 5, torch.float32, seed=7, ignored=())
    # no weight grad; a different ignore_index; 3-D hidden
    t2 = t.clone()
    t2[2] = 7
    a = _ce_run(ours, h.view(2, 3, 5), w, t2.view(2, 3), weight_grad=False, ignore_index=7, chunk_size=4)
    b = _ce_run(fused_linear_cross_entropy_reference, h.view(2, 3, 5), w, t2.view(2, 3), weight_grad=False,
                ignore_index=7, chunk_size=4)
    _check(a, b, 1e-5, "cross-entropy options")
    with torch.no_grad():
        torch.testing.assert_close(ours(h, w, t), F.cross_entropy(h @ w.T, t, reduction="sum"))
    # all ignored: zero loss and zero grads
    z = _ce_run(ours, h, w, torch.full((6,), -100))
    assert z[0].item() == 0.0 and (z[1] == 0).all() and (z[2] == 0).all()
    # a target outside [0, V) poisons the loss instead of reading out of bounds
    bad = t.clone()
    bad[3] = 33
    assert torch.isnan(ours(h, w, bad)).item()


# ---------------------------------------------------------------- CUDA: bf16 against float64

def _cuda_rand(g, *shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda", generator=g, dtype=torch.float32) * scale).to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 300, 8, 128), (3, 1001, 2048), (2, 77, 4096), (1, 5, 8192), (7, 333)])
def test_cuda_rms_norm_bf16_vs_float64(shape):
    g = _gen(10, "cuda")
    x = _cuda_rand(g, *shape).requires_grad_()
    w = (1 + 0.2 * torch.randn(shape[-1], device="cuda", generator=g)).requires_grad_()
    dy = _cuda_rand(g, *shape)
    assert kernels.backend("rms_norm", x, w) == "triton"
    ours = _grads(lambda a, b: kernels.rms_norm(a, b, 1e-6), (x, w), dy)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6), (xd, wd), dy.double())
    for name, a, b in zip(("y", "dx", "dw"), ours, exact):
        assert _rel(a, b) <= 1e-2, (shape, name, _rel(a, b))
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    wide = torch.zeros(2, 9000, device="cuda", dtype=torch.bfloat16)
    assert kernels.backend("rms_norm", wide, torch.ones(9000, device="cuda")) == "torch"


@pytest.mark.gpu
def test_cuda_rms_norm_backward_variants_bf16_vs_float64():
    """The backward loop variants (the benchmark's candidates; staged ones compile to cp.async only
    on a GPU) against float64, widths that stage and one that cannot (not a multiple of 16)."""
    from seqpar.kernels.norm_rope import triton as nr
    g = _gen(14, "cuda")
    for shape in ((3, 1001, 2048), (1, 700, 8192), (2, 99, 333)):
        x = _cuda_rand(g, *shape).requires_grad_()
        w = (1 + 0.2 * torch.randn(shape[-1], device="cuda", generator=g)).requires_grad_()
        dy = _cuda_rand(g, *shape)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        exact = _grads(lambda a, b: rms_norm_reference(a, b, 1e-6), (xd, wd), dy.double())
        for name in nr.RMS_BWD_VARIANTS:
            ours = _grads(lambda a, b: nr.rms_norm_triton(a, b, 1e-6, bwd_variant=name), (x, w), dy)
            for what, a, b in zip(("y", "dx", "dw"), ours, exact):
                assert _rel(a, b) <= 1e-2, (shape, name, what, _rel(a, b))


@pytest.mark.gpu
@pytest.mark.parametrize("B,S,H,D,per_batch", [(1, 4097, 32, 128, False), (2, 333, 8, 64, True),
                                               (3, 17, 5, 96, False), (1, 1, 2, 128, True)])
def test_cuda_rotary_bf16_vs_float64(B, S, H, D, per_batch):
    g = _gen(11, "cuda")
    x = _cuda_rand(g, B, S, H, D).requires_grad_()
    pos = torch.randint(0, 200000, (B, S) if per_batch else (S,), device="cuda", generator=g)
    cos, sin = kernels.rotary_cos_sin(pos, D, 500000.0)
    dy = _cuda_rand(g, B, S, H, D)
    assert kernels.backend("apply_rotary", x, cos, sin) == "triton"
    ours = _grads(kernels.apply_rotary, (x, cos, sin), dy)
    xd = x.detach().double().requires_grad_()
    exact = _grads(apply_rotary_reference, (xd, cos.double(), sin.double()), dy.double())
    for name, a, b in zip(("y", "dx"), ours, exact):
        assert _rel(a, b) <= 1e-2, ((B, S, H, D), name, _rel(a, b))
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("N,V,d,chunk,autocast", [(3001, 5000, 256, 1024, False), (777, 32003, 128, 4096, False),
                                                  (2048, 4096, 512, 300, True)])
def test_cuda_fused_cross_entropy_bf16_vs_float64(N, V, d, chunk, autocast):
    g = _gen(12, "cuda")
    dtype = torch.float32 if autocast else torch.bfloat16  # under autocast: fp32 leaves, bf16 matmuls
    h = _cuda_rand(g, N, d, dtype=dtype).requires_grad_()
    w = _cuda_rand(g, V, d, dtype=dtype, scale=0.05).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[::7] = -100
    assert kernels.backend("fused_linear_cross_entropy", h, w) == "triton"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = kernels.fused_linear_cross_entropy(h, w, t, chunk_size=chunk)
    (loss / 3).backward()
    hd, wd = h.detach().bfloat16().double().requires_grad_(), w.detach().bfloat16().double().requires_grad_()
    ref = F.cross_entropy(hd @ wd.T, t, reduction="sum")
    (ref / 3).backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == dtype and w.grad.dtype == dtype
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    for name, a, b in (("dh", h.grad, hd.grad), ("dw", w.grad, wd.grad)):
        assert _rel(a, b) <= 1e-2, (name, _rel(a, b))
    # the reference path agrees on the same inputs
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), torch.no_grad():
        other = fused_linear_cross_entropy_reference(h, w, t, chunk_size=chunk)
    assert abs(other.item() - loss.item()) <= 1e-4 * abs(ref.item())


@pytest.mark.gpu
def test_cuda_model_step_matches_reference_kernels(monkeypatch):
    """The decoder in fp32 with the fast paths (these kernels; fp32 attention stays with the
    reference) against SEQPAR_KERNELS=reference: one loss and every gradient, packed documents.
    fp32 so that only these kernels differ, by summation order: bf16 noise in the attention
    kernels would swamp the nearly-uniform attention's small q/k gradients of a fresh model."""
    from types import SimpleNamespace

    from seqpar.attention import AttnContext
    from seqpar.model.transformer import Transformer

    cfg = SimpleNamespace(vocab_size=1000, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=None,
                          ffn_dim=512, layer_pattern="S", rope_theta=10000.0, norm_eps=1e-5, init_std=0.02,
                          linear_decay="transnormer")
    model = Transformer(cfg).cuda()
    model.init_weights(0)
    lengths = [1, 300, 77, 646]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ctx = AttnContext(cu_seqlens=cu, position_ids=torch.cat([torch.arange(n) for n in lengths]).cuda())
    g = _gen(13, "cuda")
    ids = torch.randint(0, 1000, (1, sum(lengths)), device="cuda", generator=g)
    targets = torch.randint(0, 1000, (1, sum(lengths)), device="cuda", generator=g)
    targets[0, cu[1:].long() - 1] = -100

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, ctx, targets=targets)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    x = torch.zeros(1, 8, 4, 64, device="cuda")
    assert [kernels.backend(op, x, x) for op in ("rms_norm", "apply_rotary", "fused_linear_cross_entropy")] == \
        ["triton"] * 3
    fast_loss, fast = step()
    monkeypatch.setenv("SEQPAR_KERNELS", "reference")
    ref_loss, ref = step()
    assert abs(fast_loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    for name, grad in ref.items():
        assert _rel(fast[name], grad) <= 1e-4, (name, _rel(fast[name], grad))


def test_dispatch_keeps_tensor_subclasses_off_triton():
    """Triton reads raw storage: DTensors (tensor parallelism's SequenceParallel norms) and other
    subclasses must take the torch paths, plain tensors and Parameters may take Triton."""
    from seqpar.kernels import dispatch

    class Wrapped(torch.Tensor):
        pass

    x = torch.zeros(2, 3)
    assert dispatch._plain(x, torch.nn.Parameter(x), None)
    assert not dispatch._plain(x, x.as_subclass(Wrapped))
