"""Core-attention disaggregation: planner invariants, and disagg_attention exact against
single-process attention on a mix where the plan really moves and splits work."""
import bisect
import random
import time

import pytest
import torch

from seqpar import kernels
from seqpar.attention import SOFTMAX_SP, disagg_attention
from seqpar.attention.disagg import TASK_OVERHEAD, pairs, plan, task_cost
from seqpar.parallel.sharding import local_ranges, shard_sequence, unshard_sequence
from tests.distributed import run_distributed


def _bounds(lengths, multiple):
    """Boundaries of `lengths` packed, the last document padded so the total divides `multiple`."""
    b = [0]
    for n in lengths:
        b.append(b[-1] + n)
    b[-1] += -b[-1] % multiple
    return b


def _check_plan(p, bounds, world, layout, min_chunk):
    owned = [local_ranges(bounds[-1], world, r, layout) for r in range(world)]
    edges = set(bounds) | {x for rs in owned for r in rs for x in r}
    pos = 0  # sorted by q_start, the tasks must tile [0, total) exactly: every query once
    for t in sorted(p.tasks, key=lambda t: t.q_start):
        assert 0 <= t.server < world and t.q_start == pos and t.q_end > t.q_start, f"{t} (covered up to {pos})"
        pos = t.q_end
        i = bisect.bisect_right(bounds, t.q_start) - 1
        assert t.kv_start == bounds[i] and t.q_end <= bounds[i + 1], f"{t} leaves its document"
        assert any(a <= t.q_start and t.q_end <= b for a, b in owned[t.owner]), f"{t} not held by its owner"
        if t.q_end - t.q_start < min_chunk:  # only pieces the data gave: a document cut by a shard edge
            assert t.q_start in edges and t.q_end in edges, f"{t} cut below min_chunk={min_chunk}"
    assert pos == bounds[-1], "every query token in exactly one task"
    loads = [0] * world
    for t in p.tasks:
        loads[t.server] += task_cost(t.q_start, t.q_end, t.kv_start)
    assert loads == p.loads


def test_task_cost_counts_causal_pairs():
    # queries [10, 14) of a document starting at 4 see 7, 8, 9, 10 keys
    assert pairs(10, 14, 4) == 7 + 8 + 9 + 10
    assert task_cost(10, 14, 4) == 34 + TASK_OVERHEAD


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("seed", range(6))
def test_plan_invariants_random_mixes(layout, seed):
    rng = random.Random(seed)
    world = rng.choice([1, 2, 3, 4, 8])
    kind = seed % 3
    if kind == 0:  # long-tailed: mostly short documents, a few long ones
        lengths = [rng.choice([rng.randint(1, 300), rng.randint(1000, 6000)]) for _ in range(rng.randint(5, 80))]
    elif kind == 1:  # one document holding most of the tokens
        lengths = [rng.randint(1, 50) for _ in range(20)] + [8000] + [rng.randint(1, 50) for _ in range(20)]
    else:  # uniform short documents: nothing to gain, nothing should break
        lengths = [rng.randint(1, 64) for _ in range(200)]
    bounds = _bounds(lengths, 2 * world)
    min_chunk = rng.choice([16, 128])
    p = plan(bounds, world, layout=layout, min_chunk=min_chunk)
    _check_plan(p, bounds, world, layout, min_chunk)
    assert p == plan(torch.tensor(bounds, dtype=torch.int32), world, layout=layout, min_chunk=min_chunk), \
        "deterministic, and tensors plan like lists"
    assert max(p.loads) <= max(p.initial_loads), "planning never makes the slowest server slower"


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_plan_balances_one_long_document_among_small_ones(layout):
    rng = random.Random(0)
    lengths = [4096] + [rng.randint(16, 256) for _ in range(60)]
    bounds = _bounds(lengths, 8)
    p = plan(bounds, 4, layout=layout, eps=0.1)
    _check_plan(p, bounds, 4, layout, 128)
    mean = sum(p.loads) / 4
    assert max(p.initial_loads) > 1.5 * mean, "the case must start unbalanced"
    assert all(abs(x - mean) <= 0.1 * mean for x in p.loads), (p.loads, mean)
    assert any(t.server != t.owner for t in p.tasks)
    tight = plan(bounds, 4, layout=layout, eps=0.02)
    assert tight.imbalance <= 1.02 + 1e-9, tight.loads


def test_plan_1000_documents_is_fast():
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(1, 500), rng.randint(2000, 30000)]) for _ in range(1000)]
    bounds = _bounds(lengths, 16)
    plan(bounds, 8)  # warm imports
    t0 = time.perf_counter()
    p = plan(bounds, 8)
    elapsed = time.perf_counter() - t0
    _check_plan(p, bounds, 8, "contiguous", 128)
    assert p.imbalance <= 1.1
    assert elapsed < 0.5, f"planner took {elapsed:.3f} s for 1000 documents"  # sanity bound, not a benchmark


# world 4 x 2 chunks of 100: one document holds ~86% of the tokens and spans every rank, a
# 1-token document; min_chunk=16 lets the planner split the long document across servers.
SEQ = 800
DOCS = [0, 1, 9, 700, 701, 725, 800]


def _exact(rank, world):
    errs = {}
    for causal, layout in ((True, "contiguous"), (True, "zigzag"), (False, "contiguous"), (False, "zigzag")):
        for hq, hkv in ((8, 2), (4, 4)):
            g = torch.Generator().manual_seed(hq + hkv)
            q = torch.randn(1, SEQ, hq, 8, generator=g, dtype=torch.float64)
            k = torch.randn(1, SEQ, hkv, 8, generator=g, dtype=torch.float64)
            v = torch.randn(1, SEQ, hkv, 6, generator=g, dtype=torch.float64)
            grad = torch.randn(1, SEQ, hq, 6, generator=g, dtype=torch.float64)
            cu = torch.tensor(DOCS, dtype=torch.int32)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = kernels.flash_attn(*full, causal=causal, cu_seqlens=cu)
            ref.backward(grad)
            local = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
            out = disagg_attention(*local, causal=causal, cu_seqlens=cu, layout=layout, min_chunk=16)
            out.backward(shard_sequence(grad, layout=layout))
            err = [(unshard_sequence(out.detach(), layout=layout) - ref.detach()).abs().max().item()]
            err += [(l.grad - shard_sequence(f.grad, layout=layout)).abs().max().item() for l, f in zip(local, full)]
            errs[(causal, layout, hq, hkv)] = max(err)
    moved = split = 0
    for layout in ("contiguous", "zigzag"):
        p = plan(DOCS, world, layout=layout, min_chunk=16)
        edges = set(DOCS) | {x for r in range(world) for rs in local_ranges(SEQ, world, r, layout) for x in rs}
        moved += sum(t.server != t.owner for t in p.tasks)
        split += sum(t.q_start not in edges or t.q_end not in edges for t in p.tasks)
    return errs, moved, split


def test_disagg_attention_exact_on_extreme_mix():
    results = run_distributed(_exact, 4)
    for errs, moved, split in results:
        assert moved > 0 and split > 0, "the plan must move and split work, or this test proves nothing"
        for case, err in errs.items():
            assert err < 1e-10, f"(causal, layout, hq, hkv)={case}: max error {err}"


def test_disagg_is_a_registered_softmax_method():
    assert SOFTMAX_SP["disagg"] is disagg_attention
