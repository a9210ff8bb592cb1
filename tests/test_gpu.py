"""Checks that only the GPU machine can make (`pytest -m gpu`): the CUDA kernel choices against
the float64 reference, and the NCCL paths of sequence parallelism."""
import pytest
import torch

from seqpar import kernels
from seqpar.kernels import dispatch
from tests.distributed import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("cu", [None, [0, 1000, 1001, 2900, 4096]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_flash_attn_matches_fp64_reference(cu, dtype):
    q, k, v, g = _rand(1, 4096, 8, 64, seed=0), _rand(1, 4096, 2, 64, seed=1), _rand(1, 4096, 2, 64, seed=2), _rand(1, 4096, 8, 64, seed=3)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = kernels.flash_attn(*ref_in, causal=True, cu_seqlens=cu_t)
    ref.backward(g)
    dev_in = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attn(*dev_in, causal=True, cu_seqlens=None if cu_t is None else cu_t.cuda())
    out.backward(g.to("cuda", dtype))
    tol = 3e-2 if dtype == torch.bfloat16 else 2e-3
    assert (out.double().cpu() - ref).abs().max() < tol
    for a, b in zip(dev_in, ref_in):
        assert (a.grad.double().cpu() - b.grad).abs().max() < 4 * tol


def test_cuda_varlen_query_key_ranges_align_bottom_right():
    cu_q, cu_k = [0, 100, 164, 400], [0, 300, 364, 1000]
    q, k, v = _rand(1, 400, 4, 64, seed=4), _rand(1, 1000, 4, 64, seed=5), _rand(1, 1000, 4, 64, seed=6)
    tq, tk = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    ref = kernels.flash_attn(q, k, v, causal=True, cu_seqlens_q=tq, cu_seqlens_k=tk)
    out = kernels.flash_attn(*(t.cuda().bfloat16() for t in (q, k, v)), causal=True, cu_seqlens_q=tq.cuda(), cu_seqlens_k=tk.cuda())
    assert (out.double().cpu() - ref).abs().max() < 3e-2


def _sp_on_nccl(rank, world):
    from tests.test_sequence_parallel import _check_all
    return _check_all(rank, world, device=f"cuda:{rank}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sequence_parallel_on_nccl():
    for errors in run_distributed(_sp_on_nccl, 2, backend="nccl"):
        for case, err in errors.items():
            assert err < 1e-8, (case, err)
