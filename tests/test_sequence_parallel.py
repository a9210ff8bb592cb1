"""Every sequence-parallel attention method against single-process attention on the whole
sequence: outputs and the gradients of q, k, v, fp64, packed documents of awkward lengths,
GQA, both layouts, world sizes 1, 2 and 4."""
import pytest
import torch

from seqpar import kernels
from seqpar.attention import LINEAR_SP, SOFTMAX_SP
from seqpar.parallel.sharding import shard_sequence, unshard_sequence
from tests.distributed import run_distributed

SEQ = 96  # 2*4 chunks of 12
DOCS = [0, 1, 13, 50, 51, 79, 96]  # a 1-token document, documents crossing chunk and rank edges


def _cases():
    for layout in ("contiguous", "zigzag"):
        for packed in (True, False):
            yield layout, packed


def _inputs(kind, packed, seed):
    g = torch.Generator().manual_seed(seed)
    B = 1 if packed else 2
    hq, hkv = (4, 2) if kind == "softmax" else (3, 3)
    dk, dv = (8, 8) if kind == "softmax" else (6, 5)
    q = torch.randn(B, SEQ, hq, dk, generator=g, dtype=torch.float64)
    k = torch.randn(B, SEQ, hkv, dk, generator=g, dtype=torch.float64)
    v = torch.randn(B, SEQ, hkv, dv, generator=g, dtype=torch.float64)
    grad = torch.randn(B, SEQ, hq, dv, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(hq, generator=g, dtype=torch.float64) * 0.3
    cu = torch.tensor(DOCS, dtype=torch.int32) if packed else None
    return q, k, v, grad, log_decay, cu


def _reference(kind, q, k, v, log_decay, cu):
    if kind == "softmax":
        return kernels.flash_attn(q, k, v, causal=True, cu_seqlens=cu)
    return kernels.lightning_attn(q, k, v, log_decay, cu_seqlens=cu)[0]


def _parallel(kind, method, q, k, v, log_decay, cu, layout):
    if kind == "softmax":
        return SOFTMAX_SP[method](q, k, v, causal=True, cu_seqlens=cu, layout=layout)
    return LINEAR_SP[method](q, k, v, log_decay=log_decay, cu_seqlens=cu, layout=layout)


def _check_all(rank, world, device="cpu"):
    errors = {}
    methods = [("softmax", m) for m in SOFTMAX_SP] + [("linear", m) for m in LINEAR_SP]
    for kind, method in methods:
        for i, (layout, packed) in enumerate(_cases()):
            q, k, v, grad, log_decay, cu = (None if t is None else t.to(device) for t in _inputs(kind, packed, seed=i))
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = _reference(kind, *full, log_decay, cu)
            ref.backward(grad)
            local = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
            out = _parallel(kind, method, *local, log_decay, cu, layout)
            out.backward(shard_sequence(grad, layout=layout))
            err = [(unshard_sequence(out.detach(), layout=layout) - ref.detach()).abs().max().item()]
            err += [(l.grad - shard_sequence(f.grad, layout=layout)).abs().max().item() for l, f in zip(local, full)]
            errors[(kind, method, layout, packed)] = max(err)
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sequence_parallel_attention_matches_single_process(world):
    results = run_distributed(_check_all, world)
    for rank_errors in results:
        for case, err in rank_errors.items():
            assert err < 1e-10, f"world={world} {case}: max error {err}"


def _roundtrip(rank, world):
    x = torch.arange(2 * 48 * 3, dtype=torch.float64).reshape(2, 48, 3)
    return [torch.equal(unshard_sequence(shard_sequence(x, layout=lay), layout=lay), x) for lay in ("contiguous", "zigzag")]


def test_shard_unshard_roundtrip():
    assert all(all(r) for r in run_distributed(_roundtrip, 4))


def test_zigzag_balances_causal_work():
    from seqpar.parallel.sharding import local_ranges
    work = [sum(b * (b + 1) // 2 - a * (a + 1) // 2 for a, b in local_ranges(64, 4, r, "zigzag")) for r in range(4)]
    assert len(set(work)) == 1, work  # each rank: one early and one late chunk


def test_host_bounds_read_once_per_tensor_and_version():
    """Every layer of a step passes the same cu_seqlens: its host copy is read once (each read is a
    device sync), kept while the tensor lives and read again after an in-place change."""
    import gc

    from seqpar.parallel import sharding

    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    first = sharding.host_bounds(cu)
    assert first == (0, 3, 10) and sharding.host_bounds(cu) is first
    other = torch.tensor([0, 3, 10], dtype=torch.int32)
    assert sharding.host_bounds(other) is not first  # equal values, another tensor: its own entry
    cu[1] = 4
    assert sharding.host_bounds(cu) == (0, 4, 10)
    assert sharding.host_bounds([0, 5]) == (0, 5)
    gc.collect()  # entries of earlier tests' tensors that only a collection frees leave first
    n = len(sharding._HOST_BOUNDS)
    del cu
    gc.collect()
    assert len(sharding._HOST_BOUNDS) == n - 1
