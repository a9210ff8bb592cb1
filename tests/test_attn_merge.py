"""attn_merge_ (a ring step's result folded into a row's running result): the reference against
float64 math, the Triton kernel against the reference through the interpreter (CPU) and on CUDA
(`gpu`), rows that saw no key, an output that is the running buffer itself, strided views."""
import pytest
import torch

from seqpar.kernels import dispatch
from seqpar.kernels.attn_merge import attn_merge_
from seqpar.kernels.attn_merge.reference import attn_merge_reference_
from tests.triton_interpreter import interp_only, run_interpreter_tests

F64 = torch.float64


def _case(B, n, H, D, seed, dtype=torch.float32, device="cpu", unseen=True):
    """(old, o, lse, l) with some rows where only one side saw keys and some where neither did."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    old, o = (torch.randn(B, n, H, D, generator=g).to(device, dtype) for _ in range(2))
    stats = F64 if dtype == F64 else torch.float32  # the merge runs in lse's dtype
    lse, l = (torch.randn(B, H, n, generator=g).mul(4).to(device, stats) for _ in range(2))
    if unseen:
        lse[:, :, 1::5] = float("-inf")  # the running result has seen nothing yet
        l[:, :, 2::5] = float("-inf")  # the block saw no key for these queries
        lse[:, :, 3::7] = l[:, :, 3::7] = float("-inf")  # neither: 0, lse -inf
        old[:, 3::7] = 0
    return old, o, lse, l


def _exact(old, o, lse, l):
    """(out, lse) in float64 from the definition: the softmax-weighted mean of the two results."""
    lse, l = lse.double(), l.double()
    new = torch.logaddexp(lse, l)
    seen = torch.isfinite(new)
    w_old = torch.where(seen, (lse - new).exp(), 0).transpose(1, 2)[..., None]
    w_new = torch.where(seen, (l - new).exp(), 0).transpose(1, 2)[..., None]
    return old.double() * w_old + o.double() * w_new, new


def test_reference_matches_float64_math():
    old, o, lse, l = _case(2, 37, 3, 40, seed=0, dtype=F64)
    want_out, want_lse = _exact(old, o, lse, l)
    out = torch.empty_like(old)
    attn_merge_(old, o, lse, l, out)
    assert torch.allclose(out, want_out, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and torch.allclose(lse, want_lse, rtol=1e-12)
    assert not out[:, 3::7].any(), "a row that saw no key stays 0"


def test_dispatch_and_shape_errors():
    old, o, lse, l = _case(1, 8, 2, 16, seed=1)
    assert dispatch.backend("attn_merge", old, o, lse, l, old) == "reference"  # CPU
    with pytest.raises(ValueError, match="attn_merge_"):
        attn_merge_(old, o, lse[:, :, :4], l, old)


def _compare(device, dtype, seed, tol):
    """The Triton kernel against the reference: out a separate buffer (bf16 from fp32 rows, as a
    row's last result), out = old (the running fp32 buffer), views of larger tensors."""
    from seqpar.kernels.attn_merge.triton import attn_merge_triton_

    for B, n, H, D in ((1, 37, 3, 40), (2, 130, 2, 64), (1, 5, 4, 128)):
        old, o, lse, l = _case(B, n, H, D, seed, dtype=torch.float32, device=device)
        o = o.to(dtype)
        for out_dtype in (dtype, torch.float32):
            want, got = torch.empty(B, n, H, D, dtype=out_dtype, device=device), None
            lse_ref, lse_got = lse.clone(), lse.clone()
            attn_merge_reference_(old, o, lse_ref, l, want)
            got = torch.empty_like(want)
            attn_merge_triton_(old, o, lse_got, l, got)
            assert torch.allclose(got.double(), want.double(), rtol=tol, atol=tol), (B, n, H, D, out_dtype)
            assert torch.equal(torch.isinf(lse_got), torch.isinf(lse_ref))
            assert torch.allclose(lse_got, lse_ref, rtol=1e-6, atol=1e-6)
        # in place into the running buffer, through views of a longer one and of its lse
        acc = torch.randn(B, n + 9, H, D, device=device)
        acc_lse = torch.randn(B, H, n + 9, device=device)
        acc[:, 4:4 + n] = old
        acc_lse[:, :, 4:4 + n] = lse
        want_acc, want_lse = acc.clone(), acc_lse.clone()
        attn_merge_reference_(want_acc[:, 4:4 + n], o, want_lse[:, :, 4:4 + n], l, want_acc[:, 4:4 + n])
        attn_merge_triton_(acc[:, 4:4 + n], o, acc_lse[:, :, 4:4 + n], l, acc[:, 4:4 + n])
        assert torch.allclose(acc, want_acc, rtol=1e-5, atol=1e-5)
        assert torch.allclose(acc_lse, want_lse, rtol=1e-6, atol=1e-6)


def test_triton_interpreter_subprocess():
    pytest.importorskip("triton")
    run_interpreter_tests(__file__)


@interp_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interp_triton_matches_reference(dtype):
    # the interpreter stores bf16 by truncation: 2^-8 relative, twice the rounding error
    _compare("cpu", dtype, seed=2, tol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference_and_is_dispatched(dtype):
    _compare("cuda", dtype, seed=3, tol=1e-5 if dtype == torch.float32 else 8e-3)
    old, o, lse, l = _case(1, 64, 2, 128, seed=4, dtype=dtype, device="cuda")
    assert dispatch.backend("attn_merge", old.float(), o, lse, l, old) == "triton"
    assert dispatch.backend("attn_merge", old.double(), o.double(), lse.double(), l.double(), old.double()) == "reference"
