"""block_sum_ (a few blocks' gradients summed into one buffer, in fp32, rounded once): the reference
against float64 math and against the rounding it promises, the Triton kernel against the
reference through the interpreter (CPU) and on CUDA (`gpu`), an output that is one of the parts,
strided views, dispatch and shape errors."""
import pytest
import torch

from seqpar.kernels import dispatch
from seqpar.kernels.block_sum import block_sum_
from seqpar.kernels.block_sum.reference import block_sum_reference_
from tests.triton_interpreter import interp_only, run_interpreter_tests

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def _parts(shape, dtypes, seed, device="cpu"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(*shape, generator=g).mul(3).to(device, dt) for dt in dtypes]


def test_reference_sums_in_fp32_and_rounds_once():
    # three bf16 blocks into bf16: the fp32 sum rounded once (not (a + b) rounded, then + c rounded)
    shape = (2, 33, 3, 24)
    for dtypes, out_dtype in (((BF16, BF16, BF16), BF16), ((BF16, BF16), F32), ((F32, BF16), BF16),
                              ((BF16, BF16, BF16, BF16), F32), ((F64, F32), F64)):
        parts = _parts(shape, dtypes, seed=len(dtypes))
        want = sum(p.double() for p in parts)
        wide = F64 if F64 in dtypes + (out_dtype,) else F32
        once = sum(p.to(wide) for p in parts).to(out_dtype)  # the sum in order, in the wide dtype
        out = torch.empty(shape, dtype=out_dtype)
        block_sum_(out, parts)
        assert torch.equal(out, once), (dtypes, out_dtype)
        tol = {BF16: 2 ** -8, F32: 1e-6, F64: 1e-15}[out_dtype]
        assert ((out.double() - want).abs() <= tol * want.abs() + 1e-30).all(), (dtypes, out_dtype)


def test_reference_into_one_of_its_parts():
    a, b, c = _parts((1, 17, 2, 8), (F32, BF16, BF16), seed=3)
    want = a + b.float() + c.float()
    block_sum_(a, [a, b, c])  # a running fp32 sum folding two blocks in
    assert torch.equal(a, want)
    x, y = _parts((1, 17, 2, 8), (BF16, BF16), seed=4)
    want = (x.float() + y.float()).bfloat16()
    block_sum_(y, [x, y])  # out is the second part: read before it is written
    assert torch.equal(y, want)


def test_dispatch_and_errors():
    a, b = _parts((1, 8, 2, 16), (BF16, BF16), seed=5)
    assert dispatch.backend("block_sum", a, a, b) == "reference"  # CPU
    with pytest.raises(ValueError, match="block_sum_: parts"):
        block_sum_(a, [a, b[:, :4]])
    with pytest.raises(ValueError, match="no parts"):
        block_sum_(a, [])
    out = torch.empty_like(a)
    assert torch.equal(block_sum_(out, [b]), b)  # one part: a copy


def _compare(device, seed, tol):
    """The Triton kernel against the reference: two and three parts of mixed dtypes into bf16 and
    fp32, out the first part (a running sum), views of rows of a longer buffer."""
    from seqpar.kernels.block_sum.triton import block_sum_triton_

    for B, n, H, D in ((1, 37, 3, 40), (2, 130, 2, 64), (1, 5, 4, 128)):
        for dtypes, out_dtype in (((BF16, BF16, BF16), BF16), ((BF16, BF16), F32), ((F32, BF16), BF16),
                                  ((F32, BF16, BF16), F32), ((F32, F32), F32)):
            parts = _parts((B, n, H, D), dtypes, seed, device)
            want, got = (torch.empty(B, n, H, D, dtype=out_dtype, device=device) for _ in range(2))
            block_sum_reference_(want, parts)
            block_sum_triton_(got, parts)
            t = tol if out_dtype == BF16 else 1e-6
            assert torch.allclose(got.double(), want.double(), rtol=t, atol=t), (B, n, H, D, dtypes, out_dtype)
        # into rows of a longer fp32 buffer that is also the first part
        buf = torch.randn(B, n + 9, H, D, device=device)
        blocks = _parts((B, n, H, D), (BF16, BF16), seed + 1, device)
        want = buf.clone()
        block_sum_reference_(want[:, 4:4 + n], [want[:, 4:4 + n], *blocks])
        block_sum_triton_(buf[:, 4:4 + n], [buf[:, 4:4 + n], *blocks])
        assert torch.allclose(buf, want, rtol=1e-6, atol=1e-6)


def test_triton_interpreter_subprocess():
    pytest.importorskip("triton")
    run_interpreter_tests(__file__)


@interp_only
def test_interp_triton_matches_reference():
    # the interpreter stores bf16 by truncation: 2^-8 relative, twice the rounding error
    _compare("cpu", seed=6, tol=2e-2)


@pytest.mark.gpu
def test_cuda_triton_matches_reference_and_is_dispatched():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _compare("cuda", seed=7, tol=8e-3)
    a, b, c = _parts((1, 64, 2, 128), (BF16, BF16, BF16), seed=8, device="cuda")
    assert dispatch.backend("block_sum", a, a, b, c) == "triton"
    assert dispatch.backend("block_sum", a.double(), a.double(), b.double()) == "reference"
    assert dispatch.backend("block_sum", a, a, b, c, c) == "reference"  # four parts: torch's ops
