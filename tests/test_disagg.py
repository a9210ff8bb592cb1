"""Core-attention disaggregation: planner invariants, and disagg_attention exact against
single-process attention on a mix where the plan really moves and splits work."""
import bisect
import json
import os
import random
import time
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from seqpar import kernels
from seqpar.attention import SOFTMAX_SP, disagg_attention
from seqpar.attention.disagg import TASK_OVERHEAD, KernelSpeed, pairs, plan, task_cost
from seqpar.parallel.sharding import local_ranges, shard_sequence, unshard_sequence
from tests.distributed import run_distributed


def _bounds(lengths, multiple):
    """Boundaries of `lengths` packed, the last document padded so the total divides `multiple`."""
    b = [0]
    for n in lengths:
        b.append(b[-1] + n)
    b[-1] += -b[-1] % multiple
    return b


def _check_plan(p, bounds, world, layout, min_chunk, speed=None):
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
        loads[t.server] += task_cost(t.q_start, t.q_end, t.kv_start, speed=speed)
    assert loads == pytest.approx(p.loads, rel=1e-12)


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
    speed = rng.choice([None, KernelSpeed(rng.randint(64, 1024), rng.randint(1500, 7000), rng.random() < 0.5,
                                            rng.choice([0.8, 1.7]))])
    p = plan(bounds, world, layout=layout, min_chunk=min_chunk, speed=speed)
    _check_plan(p, bounds, world, layout, min_chunk, speed)
    assert p == plan(torch.tensor(bounds, dtype=torch.int32), world, layout=layout, min_chunk=min_chunk,
                     speed=speed), \
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


def test_plan_weighs_pairs_by_the_kernel_that_runs_them():
    """With a KernelSpeed, the pairs cuDNN would not take (a document's past its head of max_len;
    pieces under min_len queries) cost triton_cost each: the plan balances those weighted loads,
    where balancing the bare pairs leaves the rank of the long document slowest; and each query row
    costs row_cost pairs more, whichever kernel runs it."""
    speed = KernelSpeed(min_len=256, max_len=3000, prefix=False, triton_cost=1.5, row_cost=0)
    head = pairs(0, 3000, 0)
    assert task_cost(0, 3584, 0, speed=speed) == head + 1.5 * (pairs(0, 3584, 0) - head) + TASK_OVERHEAD
    assert task_cost(3000, 3584, 0, speed=speed) == 1.5 * pairs(3000, 3584, 0) + TASK_OVERHEAD  # its tail
    assert task_cost(100, 3584, 0, speed=speed) == 1.5 * pairs(100, 3584, 0) + TASK_OVERHEAD  # over a prefix
    # with pieces over a prefix on cuDNN the tail is one (a causal call of its 584 queries after 3000 % 256
    # blank rows fits max_len): the whole document, and a piece cut past max_len, on cuDNN
    speed = replace(speed, prefix=True)
    for a in (0, 100, 3000):
        assert task_cost(a, 3584, 0, speed=speed) == pairs(a, 3584, 0) + TASK_OVERHEAD
    assert task_cost(0, 2896, 0, speed=speed) == task_cost(0, 2896, 0)
    assert task_cost(2800, 2896, 0, speed=speed) == 1.5 * pairs(2800, 2896, 0) + TASK_OVERHEAD  # 96 queries
    assert task_cost(1000, 2896, 0, speed=speed) == task_cost(1000, 2896, 0)  # a piece over its prefix
    no_prefix = KernelSpeed(min_len=256, max_len=3000, prefix=False, triton_cost=1.5, row_cost=0)
    assert task_cost(1000, 2896, 0, speed=no_prefix) == 1.5 * pairs(1000, 2896, 0) + TASK_OVERHEAD
    rows = KernelSpeed(min_len=256, max_len=3000, prefix=False, triton_cost=1.5, row_cost=10)
    assert task_cost(1000, 2896, 0, speed=rows) == task_cost(1000, 2896, 0, speed=no_prefix) + 10 * 1896
    bounds = [0, 4096, 6992, 8192]  # rank 0: a document past max_len; rank 1: two under it
    speed = KernelSpeed(min_len=256, max_len=2900, prefix=True, triton_cost=1.7)

    def weighted(p):
        loads = [0.0, 0.0]
        for t in p.tasks:
            loads[t.server] += task_cost(t.q_start, t.q_end, t.kv_start, speed=speed)
        return max(loads) / (sum(loads) / 2)

    blind, aware = plan(bounds, 2, eps=0.05), plan(bounds, 2, eps=0.05, speed=speed)
    _check_plan(aware, bounds, 2, "contiguous", 128, speed)
    assert weighted(blind) > 1.15 and aware.imbalance == weighted(aware) <= 1.05, (weighted(blind), aware.loads)


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
# (causal, layout, hq, hkv, schedule): ping-pong everywhere, halves, local_remote and single (the default) in
# two cases each
CASES = [(c, lay, hq, hkv, "ping_pong") for c in (True, False) for lay in ("contiguous", "zigzag")
         for hq, hkv in ((8, 2), (4, 4))]
CASES += [(True, "zigzag", 8, 2, "halves"), (False, "contiguous", 4, 4, "halves")]
CASES += [(True, "contiguous", 8, 2, "local_remote"), (False, "zigzag", 4, 4, "local_remote")]
CASES += [(True, "contiguous", 8, 2, "single"), (False, "zigzag", 4, 4, "single")]


def _inputs(hq, hkv):
    g = torch.Generator().manual_seed(hq + hkv)
    q = torch.randn(1, SEQ, hq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, SEQ, hkv, 8, generator=g, dtype=torch.float64)
    v = torch.randn(1, SEQ, hkv, 6, generator=g, dtype=torch.float64)
    grad = torch.randn(1, SEQ, hq, 6, generator=g, dtype=torch.float64)
    return q, k, v, grad


def _exact(rank, world):
    from seqpar.attention.disagg import step_metrics
    cu = torch.tensor(DOCS, dtype=torch.int32)
    refs = []
    for i, (causal, layout, hq, hkv, _) in enumerate(CASES):  # each rank computes some references, then shares
        q, k, v, grad = _inputs(hq, hkv)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        if i % world == rank:
            kernels.flash_attn(*full, causal=causal, cu_seqlens=cu).backward(grad)
            ref = [kernels.flash_attn(*full, causal=causal, cu_seqlens=cu).detach()] + [f.grad for f in full]
        else:
            ref = [torch.empty(1, SEQ, hq, 6, dtype=torch.float64)] + [torch.empty_like(t) for t in (q, k, v)]
        for t in ref:
            dist.broadcast(t, src=i % world)
        refs.append(ref)
    errs, sent = {}, {}
    for case, (ref_out, *ref_grads) in zip(CASES, refs):
        causal, layout, hq, hkv, schedule = case
        q, k, v, grad = _inputs(hq, hkv)
        local = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
        step_metrics()
        out = disagg_attention(*local, causal=causal, cu_seqlens=cu, layout=layout, min_chunk=16,
                               schedule=schedule)
        out.backward(shard_sequence(grad, layout=layout))
        sent[case] = step_metrics(group=dist.group.WORLD)
        err = [(unshard_sequence(out.detach(), layout=layout) - ref_out).abs().max().item()]
        err += [(l.grad - shard_sequence(f, layout=layout)).abs().max().item() for l, f in zip(local, ref_grads)]
        errs[case] = max(err)
    moved = split = 0
    for layout in ("contiguous", "zigzag"):
        p = plan(DOCS, world, layout=layout, min_chunk=16)
        edges = set(DOCS) | {x for r in range(world) for rs in local_ranges(SEQ, world, r, layout) for x in rs}
        moved += sum(t.server != t.owner for t in p.tasks)
        split += sum(t.q_start not in edges or t.q_end not in edges for t in p.tasks)
    return errs, moved, split, sent


def test_disagg_attention_exact_on_extreme_mix():
    results = run_distributed(_exact, 4)
    for errs, moved, split, _ in results:
        assert moved > 0 and split > 0, "the plan must move and split work, or this test proves nothing"
        for case, err in errs.items():
            assert err < 1e-10, f"(causal, layout, hq, hkv, schedule)={case}: max error {err}"
    # metrics: the ranks' bytes sent, forward + backward, are twice the plan's modelled bytes
    # (each query row goes out and comes back, each key row out and its gradient back)
    for case in CASES:
        causal, layout, hq, hkv, schedule = case
        m = [r[3][case] for r in results]
        assert all(x["sp/disagg_calls"] == 1 and x["sp/tasks"] > 4 and x["sp/exposed_comm_ms"] >= 0 for x in m)
        waits = sorted(x["sp/exposed_comm_ms"] for x in m)  # the spread over ranks, the same on every rank
        assert all((x["sp/exposed_comm_ms_min"], x["sp/exposed_comm_ms_max"]) == (waits[0], waits[-1]) for x in m)
        assert m[0]["sp/attn_imbalance_after"] < m[0]["sp/attn_imbalance_before"]
        q_row, kv_row = hq * (8 + 6) * 8, hkv * (8 + 6) * 8
        p = plan(DOCS, 4, layout=layout, min_chunk=16, causal=causal, row_bytes=(q_row, kv_row))
        total = sum(x["sp/bytes_moved"] for x in m)
        if schedule == "ping_pong":  # the two nano-batches may both need a key row
            assert total >= 2 * p.bytes_moved > 0
        else:
            assert total == 2 * p.bytes_moved > 0, case


# the planner told which tasks a CUDA server would run on cuDNN (squares of >= 64 rows): the
# forward plan (a Triton pair at TRITON_FWD_COST) and the backward's (at 1.7) then differ
_CUDA_LIKE = KernelSpeed(min_len=64, max_len=None, prefix=False, triton_cost=1.7)
PER_DIRECTION = [(True, "zigzag", 8, 2, "single"), (True, "contiguous", 4, 4, "ping_pong"),
                 (False, "zigzag", 8, 2, "halves"), (True, "zigzag", 8, 2, "local_remote")]


def _per_direction(rank, world):
    from seqpar.attention.disagg import runtime
    runtime.kernel_speed = lambda q, k, v, opts: _CUDA_LIKE
    cu = torch.tensor(DOCS, dtype=torch.int32)
    errs = {}
    for causal, layout, hq, hkv, schedule in PER_DIRECTION:
        q, k, v, grad = _inputs(hq, hkv)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_out = kernels.flash_attn(*full, causal=causal, cu_seqlens=cu)
        ref_out.backward(grad)
        local = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
        out = disagg_attention(*local, causal=causal, cu_seqlens=cu, layout=layout, min_chunk=16, schedule=schedule,
                               plans="per_direction")
        apart = out.grad_fn.next_functions[0][0].routes_b is not None  # the call's ctx: a backward plan of its own
        out.backward(shard_sequence(grad, layout=layout))
        err = [(unshard_sequence(out.detach(), layout=layout) - ref_out.detach()).abs().max().item()]
        err += [(l.grad - shard_sequence(f.grad, layout=layout)).abs().max().item() for l, f in zip(local, full)]
        errs[(causal, layout, schedule, apart)] = max(err)
    return errs


def test_disagg_per_direction_plans_exact():
    for world in (1, 2, 4):
        for errs in run_distributed(_per_direction, world):
            for case, err in errs.items():
                assert err < 1e-10, f"world {world}, (causal, layout, schedule, apart)={case}: max error {err}"
        if world == 4:
            assert any(case[-1] for case in errs), "no call planned its backward apart: this test proves nothing"


def test_disagg_is_a_registered_softmax_method():
    assert SOFTMAX_SP["disagg"] is disagg_attention


# ---- planner: the cost model, the move choice, and the options that feed it ----

def test_noncausal_and_mirrored_costs():
    assert pairs(10, 14, 4, 30) == 4 * 26, "not causal: every query sees the whole document"
    # positions p and qs+qe-1-p together see a constant number of keys: a mirrored pair is linear in m
    qs, qe, d = 300, 1000, 100
    for m in (1, 17, 200):
        assert pairs(qs, qs + m, d) + pairs(qe - m, qe, d) == m * (qs + qe - 2 * d + 1)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_noncausal_plan_balances_with_its_own_costs(layout):
    rng = random.Random(3)
    bounds = _bounds([3000] + [rng.randint(16, 200) for _ in range(40)], 8)
    p = plan(bounds, 4, layout=layout, causal=False, eps=0.05)
    loads = [0] * 4
    for t in p.tasks:
        i = bisect.bisect_right(bounds, t.q_start) - 1
        loads[t.server] += pairs(t.q_start, t.q_end, t.kv_start, bounds[i + 1]) + TASK_OVERHEAD
    assert loads == p.loads and p.initial_imbalance > 1.15 and p.imbalance <= 1.05


def _received_bytes(p, bounds, world, layout, q_row, kv_row):
    """Bytes the servers receive for plan p, counted independently of the planner's model."""
    owned = [local_ranges(bounds[-1], world, r, layout) for r in range(world)]
    held = lambda s, x: any(a <= x < b for a, b in owned[s])
    need = [set() for _ in range(world)]
    total = 0
    for t in p.tasks:
        total += (t.q_end - t.q_start) * q_row * (t.server != t.owner)
        need[t.server].update(x for x in range(t.kv_start, t.q_end) if not held(t.server, x))
    return total + sum(map(len, need)) * kv_row


def test_moves_prefer_work_per_byte():
    # rank 0 holds doc X = [0, 600) and the head of Y = [600, 1100); rank 1 holds Y's tail, so it
    # already receives Y's keys [600, 1000): moving queries of Y's head costs only the queries, a
    # piece of X with as much work would also cost X's keys.
    bounds = [0, 600, 1100] + list(range(1200, 2001, 100))
    aware = plan(bounds, 2, overhead=0, row_bytes=(1, 1))
    moved = [(t.q_start, t.q_end) for t in aware.tasks if t.server != t.owner]
    assert len(moved) == 1 and 600 <= moved[0][0] and moved[0][1] == 1000, aware.tasks
    blind = plan(bounds, 2, overhead=0, row_bytes=(0, 0))
    assert blind.imbalance <= 1.1 and aware.imbalance <= 1.1
    cost = lambda p: _received_bytes(p, bounds, 2, "contiguous", 1, 1)
    assert cost(aware) == aware.bytes_moved < cost(blind)


def test_byte_aware_plans_move_fewer_bytes_on_random_mixes():
    aware_total = blind_total = 0
    for seed in range(8):
        rng = random.Random(seed)
        world, layout = rng.choice([2, 4]), rng.choice(["contiguous", "zigzag"])
        lengths = [rng.choice([rng.randint(1, 300), rng.randint(1500, 6000)]) for _ in range(rng.randint(4, 30))]
        bounds = _bounds(lengths, 2 * world)
        aware = plan(bounds, world, layout=layout, eps=0.05, row_bytes=(4, 1))
        blind = plan(bounds, world, layout=layout, eps=0.05, row_bytes=(0, 0))
        _check_plan(aware, bounds, world, layout, 128)
        assert aware.bytes_moved == _received_bytes(aware, bounds, world, layout, 4, 1)
        aware_total += aware.bytes_moved
        blind_total += _received_bytes(blind, bounds, world, layout, 4, 1)
    assert aware_total < 0.9 * blind_total, (aware_total, blind_total)


def test_mirrored_pairs_are_used_and_tile_their_task():
    # bytes ignored: the planner picks the move closest to the gap, often a head+tail pair
    found = 0
    for seed in range(6):
        rng = random.Random(seed)
        bounds = _bounds([rng.randint(2000, 9000)] + [rng.randint(1, 200) for _ in range(20)], 8)
        p = plan(bounds, 4, eps=0.02, row_bytes=(0, 0))
        _check_plan(p, bounds, 4, "contiguous", 128)
        pieces = {}
        for t in p.tasks:
            pieces.setdefault((t.server, t.kv_start, t.owner), []).append(t)
        for ts in pieces.values():
            for a in ts:  # a pair: a head and a tail of the same owner's range, with a gap between
                found += any(b.q_start > a.q_end and b.q_end - b.q_start == a.q_end - a.q_start for b in ts)
    assert found > 0


def _table(overhead, a=1e-7):
    return {"entries": [{"q_len": q, "kv_len": kv, "ms": a * (pairs(kv - q, kv, 0) + overhead)}
                        for q in (128, 512, 2048) for kv in (2048, 8192) if q <= kv]}


def test_cost_table_fits_the_triton_cost_per_direction():
    """A Triton pair 1.2 cuDNN pairs forward and 2.0 backward (the backward 2.5x the forward on
    cuDNN): the fit gives both, and their time-weighted blend for the two together; pieces under
    512 queries (their fixed costs dominate) and tasks the kernels share do not count."""
    from seqpar.attention.disagg import fit_triton_cost
    fwd, bwd = 1e-6, 2.5e-6  # cuDNN ms per pair
    entries = []
    for q, kv, cudnn in ((8192, 8192, True), (16384, 16384, True), (1024, 16384, False), (4096, 65536, False),
                         (128, 65536, False), (2048, 32768, None)):
        n = pairs(kv - q, kv, 0)
        wf, wb = (1.0, 1.0) if cudnn else (1.2, 2.0) if cudnn is False else (1.1, 1.5)
        extra = 0.5 if q < 512 else 0.0  # a short piece's fixed cost: ignored
        entries.append({"q_len": q, "kv_len": kv, "fwd_ms": n * fwd * wf + extra,
                        "ms": n * (fwd * wf + bwd * wb) + extra,
                        "cudnn_pairs": n if cudnn else 0 if cudnn is False else n // 2,
                        "triton_pairs": 0 if cudnn else n if cudnn is False else n - n // 2})
    got = fit_triton_cost({"entries": entries})
    assert got == {"forward": 1.2, "backward": 2.0, "both": round((1.2 * fwd + 2.0 * bwd) / (fwd + bwd), 3)}
    with pytest.raises(ValueError, match="wholly on cuDNN"):
        fit_triton_cost({"entries": [e for e in entries if not e["cudnn_pairs"]]})
    with pytest.raises(ValueError, match="per-direction times"):
        fit_triton_cost(_table(0))


def test_cost_table_fits_the_task_overhead(tmp_path):
    from seqpar.attention.disagg import fit_task_overhead, load_cost_table
    assert abs(fit_task_overhead(_table(5000)) - 5000) <= 1
    assert fit_task_overhead(_table(0)) == 0
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table(20000)))
    assert abs(fit_task_overhead(load_cost_table(str(path))) - 20000) <= 1
    heavy = plan(_bounds([3000] + [150] * 30, 8), 4, overhead=200000)
    light = plan(_bounds([3000] + [150] * 30, 8), 4, overhead=0)
    assert len(heavy.tasks) < len(light.tasks), "a costly task makes the planner cut less"


def _make_cfg(*overrides):
    from hydra import compose, initialize_config_module
    from seqpar.config import register_configs
    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        return compose(config_name="train", overrides=["train.device=cpu", "parallel.softmax_sp=disagg", *overrides])


def test_disagg_config_keys_reach_the_runtime(tmp_path):
    from seqpar.attention.disagg import configure, current
    from seqpar.attention.disagg.options import planner_overhead
    from seqpar.config import validate
    path = tmp_path / "table.json"
    path.write_text(json.dumps(_table(3000)))
    cfg = _make_cfg("parallel.disagg.eps=0.03", "parallel.disagg.min_chunk=64", "parallel.disagg.schedule=halves",
                    f"parallel.disagg.cost_table={path}", "parallel.disagg.triton_cost=1.25",
                    "parallel.disagg.plans=per_direction")
    validate(cfg, world=2)
    previous = configure(cfg.parallel.disagg)
    try:
        opts = current()
        assert (opts.eps, opts.min_chunk, opts.schedule, opts.triton_cost, opts.plans) == (
            0.03, 64, "halves", 1.25, "per_direction")
        assert abs(planner_overhead(opts) - 3000) <= 1
    finally:
        configure(previous)
    assert current() == previous
    # null (the default): the planner's measured weight
    from seqpar.attention.disagg.planner import TRITON_COST
    default = _make_cfg()
    assert default.parallel.disagg.triton_cost is None
    previous = configure(default.parallel.disagg)
    try:
        assert current().triton_cost == TRITON_COST
    finally:
        configure(previous)


@pytest.mark.parametrize("override,message", [
    ("parallel.disagg.eps=1.5", "parallel.disagg.eps=1.5: must be in [0, 1)"),
    ("parallel.disagg.min_chunk=0", "parallel.disagg.min_chunk=0: must be an integer >= 1"),
    ("parallel.disagg.schedule=both", "parallel.disagg.schedule='both': choose single, halves, ping_pong"),
    ("parallel.disagg.task_overhead=-5", "parallel.disagg.task_overhead=-5: must be >= 0"),
    ("parallel.disagg.cost_table=/nope/table.json", "parallel.disagg.cost_table=/nope/table.json: file not found"),
    ("parallel.disagg.triton_cost=-1", "parallel.disagg.triton_cost=-1.0: must be a number > 0"),
    ("parallel.disagg.plans=two", "parallel.disagg.plans='two': choose one (the backward reuses"),
])
def test_bad_disagg_keys_fail_naming_the_key(override, message):
    from seqpar.config import ConfigError, validate
    with pytest.raises(ConfigError) as e:
        validate(_make_cfg(*override.split()), world=2)
    assert message in str(e.value)


def test_overhead_from_two_places_is_refused(tmp_path):
    from seqpar.config import ConfigError, validate
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": [{"q_len": 1, "kv_len": 1}]}))
    with pytest.raises(ConfigError, match="needs an 'entries' list"):
        validate(_make_cfg(f"parallel.disagg.cost_table={path}"), world=2)
    path.write_text(json.dumps(_table(100)))
    with pytest.raises(ConfigError, match="set the other to null"):
        validate(_make_cfg(f"parallel.disagg.cost_table={path}", "parallel.disagg.task_overhead=5"), world=2)


# ---- ping-pong: the two nano-batches ----

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_nano_batches_put_remote_work_between_local_halves(causal, layout):
    from seqpar.attention.disagg.routing import nano_batches
    rng = random.Random(7)
    bounds = _bounds([5000] + [rng.randint(1, 400) for _ in range(30)], 8)
    owned = [local_ranges(bounds[-1], 4, r, layout) for r in range(4)]
    p = plan(bounds, 4, causal=causal, layout=layout)
    groups = nano_batches(p.tasks, 4, bounds, causal, 128, owned)
    pos = 0
    for t in sorted((t for g in groups for t in g), key=lambda t: t.q_start):  # every query once
        assert t.q_start == pos
        pos = t.q_end
    assert pos == bounds[-1] and len(groups) == 4, "this mix has local and remote work on every server"
    doc_end = dict(zip(bounds, bounds[1:]))
    work = lambda t: pairs(t.q_start, t.q_end, t.kv_start, None if causal else doc_end[t.kv_start])
    held = lambda s, x: any(a <= x < b for a, b in owned[s])
    for gi, g in enumerate(groups):
        for t in g:
            assert any(u.server == t.server and u.owner == t.owner and u.kv_start == t.kv_start
                       and u.q_start <= t.q_start and t.q_end <= u.q_end for u in p.tasks), t  # a piece, never moved
            end = t.q_end if causal else doc_end[t.kv_start]
            local = t.server == t.owner and all(held(t.server, x) for x in range(t.kv_start, end))
            assert local == (gi in (0, 3)), (gi, t)
    for s in range(4):  # local halves in query order: each reads its rows as few slices as the plan allows
        first, last = ([t for t in groups[i] if t.server == s] for i in (0, 3))
        assert not first or not last or max(t.q_end for t in first) <= min(t.q_start for t in last), s
        for a, b in ((0, 3), (1, 2)):
            wa, wb = (sum(work(t) for t in groups[i] if t.server == s) for i in (a, b))
            pair = [t for i in (a, b) for t in groups[i] if t.server == s]
            if len(pair) > 1 or (pair and pair[0].q_end - pair[0].q_start >= 2 * 128):  # else nothing to split
                assert min(wa, wb) > 0.3 * max(wa, wb), (s, a, b, wa, wb)
    # without ping-pong (the default): the same local halves around the remote work left whole
    plain = nano_batches(p.tasks, 4, bounds, causal, 128, owned, "halves")
    assert len(plain) == 3 and [len(g) for g in (plain[0], plain[2])] == [len(groups[0]), len(groups[3])]
    key = lambda g: sorted((t.server, t.q_start, t.q_end) for t in g)
    assert key(plain[0]) == key(groups[0]) and key(plain[2]) == key(groups[3])
    is_local = lambda t: t.server == t.owner and all(
        held(t.server, x) for x in range(t.kv_start, t.q_end if causal else doc_end[t.kv_start]))
    assert key(plain[1]) == key(t for t in p.tasks if not is_local(t)), "remote tasks whole, in one nano-batch"
    # local_remote: the plan's tasks uncut, the local ones first
    two = nano_batches(p.tasks, 4, bounds, causal, 128, owned, "local_remote")
    assert [key(g) for g in two] == [key(t for t in p.tasks if is_local(t)), key(t for t in p.tasks if not is_local(t))]


# ---- the benchmark's CPU smoke form ----

def _bench_smoke(rank, world, out, table):
    from seqpar.bench.disagg import main
    return main(["--smoke", "--mixes", "wlbllm", "lognormal", "--min-chunk", "16", "--out", out,
                 "--profile-cost-table", table])


def test_bench_disagg_smoke_form(tmp_path):
    out, table = tmp_path / "disagg.json", tmp_path / "table.json"
    assert run_distributed(_bench_smoke, 2, str(out), str(table)) == [0, 0]
    result = json.loads(out.read_text())
    assert [c["mix"] for c in result["cases"]] == ["wlbllm", "lognormal"]
    for case in result["cases"]:
        s = case["summary"]
        for m in ("disagg", "disagg_no_pingpong", "ring", "per_doc_cp", "dp_no_rebalance", "balanced_ideal"):
            assert s[f"{m}_ms"] > 0, m
        assert s["imbalance_after"] <= s["imbalance_before"]
        assert case["rows"][0]["max_abs_diff_disagg_vs_local"] < 1e-4
    assert any(r["disagg_bytes"] > 0 for c in result["cases"] for r in c["rows"]), "no batch moved work"
    # compute and transfers alone on the parts batches (the first 4 by default: all of the smoke's)
    rows = [r for c in result["cases"] for r in c["rows"]]
    assert all(len(r["disagg_timeline"]) == 2 for r in rows)  # one per rank
    # each rank's median wait per phase; a call that moved work waited (host time on CPU) somewhere
    phases = {"fwd_in", "fwd_out", "bwd_in", "bwd_out"}
    assert all(len(r["disagg_waited_by_phase"]) == 2 and all(set(w) == phases for w in r["disagg_waited_by_phase"])
               for r in rows), rows[0]["disagg_waited_by_phase"]
    assert all(r["disagg_compute_only_ms"] > 0 and (r["disagg_collectives"] > 0) == (r["disagg_bytes"] > 0)
               for r in rows), rows
    # each rank's timeline of one call: marks in the order the compute reached them
    for tl in rows[0]["disagg_no_pingpong_timeline"]:
        labels, ms = [m[0] for m in tl], [m[1] for m in tl]
        assert labels[0] == "fwd" and labels[-1] == "bwd end" and "fwd end" in labels and ms == sorted(ms), tl
        assert any(label.startswith("bwd attn") for label in labels), tl
    assert result["server_kernels"]["one_task"] == {"forward": "reference", "backward": "reference"}  # CPU
    table = json.loads(table.read_text())
    entries = table["entries"]
    assert {(e["q_len"], e["kv_len"]) for e in entries} == {(16, 64), (64, 64), (16, 256), (64, 256), (128, 128)}
    # per direction, and which kernel takes the pairs: on CPU one kernel, so no Triton-to-cuDNN ratio
    assert all(0 < e["fwd_ms"] and e["cudnn_pairs"] == 0 and e["triton_pairs"] == pairs(e["kv_len"] - e["q_len"],
               e["kv_len"], 0) for e in entries), entries
    assert table["fitted_triton_cost"] is None and "wholly on cuDNN" in table["fit_error_triton_cost"]


def _rounds(rank, world):
    from seqpar.bench.disagg import rounds_timer
    seen = []
    calls = {name: (lambda name=name: seen.append(name)) for name in ("dp", "disagg", "ring")}
    ms = rounds_timer(torch.device("cpu"), 3, 1)(calls, after=lambda name: seen.append(("after", name)))
    return seen, sorted(ms)


def test_bench_times_the_methods_in_rounds():
    # warm-ups, then every method once per round: a drift over the batch reaches all of them alike
    seen, names = run_distributed(_rounds, 1)[0]
    timed = [x for x in seen[4:] if isinstance(x, str)]
    assert seen[:4] == ["dp", "disagg", "ring", ("after", None)] and names == ["disagg", "dp", "ring"]
    assert timed == ["dp", "disagg", "ring"] * 3 and seen[5] == ("after", "dp")


# ---- GPU: bf16 on NCCL, async all-to-alls on CUDA streams (docs/benchmarks/disagg_gpu.sh runs these) ----

def _gpu_bf16(rank, world, family=None):
    if family:  # the servers' kernel family (SEQPAR_ATTN_KERNEL), else the dispatcher's choice
        os.environ["SEQPAR_ATTN_KERNEL"] = family
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    bounds = _bounds([6000, 3, 700] + [random.Random(i).randint(50, 900) for i in range(12)], 4 * world)
    S = bounds[-1]
    cu = torch.tensor(bounds, dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q, do = (torch.randn(1, S, 16, 128, device=dev, generator=g) for _ in range(2))
    k, v = (torch.randn(1, S, 4, 128, device=dev, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    kernels.flash_attn(*full, causal=True, cu_seqlens=cu).backward(do)  # fp32 reference on one GPU
    ref = [kernels.flash_attn(*full, causal=True, cu_seqlens=cu).detach()] + [f.grad for f in full]
    errs = {}
    cases = [(layout, schedule, "one") for layout in ("contiguous", "zigzag")
             for schedule in ("ping_pong", "halves", "single")]
    cases += [("zigzag", "single", "per_direction"), ("contiguous", "ping_pong", "per_direction")]
    for layout, schedule, plans in cases:
        local = [shard_sequence(t.bfloat16(), layout=layout).requires_grad_() for t in (q, k, v)]
        out = disagg_attention(*local, cu_seqlens=cu, layout=layout, schedule=schedule, plans=plans)
        out.backward(shard_sequence(do.bfloat16(), layout=layout))
        got = [out.detach()] + [t.grad for t in local]
        errs[(layout, schedule, plans)] = max(
            ((a.float() - shard_sequence(b, layout=layout)).abs().max() / b.abs().max()).item()
            for a, b in zip(got, ref))
    return errs


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("family", [None, "graph"])
def test_disagg_bf16_on_two_gpus_matches_fp32(family):
    from seqpar.kernels.flash_attn import cudnn_graph
    if family == "graph" and not cudnn_graph.available():
        pytest.skip("cuDNN's graph family needs nvidia-cudnn-frontend")
    for errs in run_distributed(_gpu_bf16, 2, family, backend="nccl"):
        for case, err in errs.items():
            assert err < 3e-2, f"(layout, schedule, plans)={case}: error {err} relative to the largest value"


def _gpu_rows_bf16(rank, world):
    """dp_cp on NCCL: rank 0 one 8k document, the other rank 32 of 256 tokens; bf16 through disagg
    over both GPUs against fp32 attention of the rank's own row."""
    from seqpar.attention.disagg import join_row_bounds, step_metrics
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    cu = torch.tensor(_bounds([8192] if rank == 0 else [256] * 32, 1), dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(rank)
    q, do = (torch.randn(1, 8192, 16, 128, device=dev, generator=g) for _ in range(2))
    k, v = (torch.randn(1, 8192, 4, 128, device=dev, generator=g) for _ in range(2))
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    kernels.flash_attn(*full, causal=True, cu_seqlens=cu).backward(do)
    ref = [kernels.flash_attn(*full, causal=True, cu_seqlens=cu).detach()] + [f.grad for f in full]
    local = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    step_metrics()
    joined = join_row_bounds(cu)
    out = disagg_attention(*local, cu_seqlens=joined, layout="contiguous")
    out.backward(do.bfloat16())
    moved = step_metrics()["sp/bytes_moved"]
    got = [out.detach()] + [t.grad for t in local]
    err = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
    # the plan gives rank 1 one piece of rank 0's document: a one-task server call, which must
    # run the split's lse form (or, without it, the Triton kernel) and, once planned, make no host
    # sync (FA2 varlen read max_seqlen; the split reads the host bounds disagg attaches)
    from tests.test_ring import _host_syncs
    again = [t.detach().requires_grad_() for t in local]
    grad = do.bfloat16()
    syncs = _host_syncs(lambda: disagg_attention(*again, cu_seqlens=joined, layout="contiguous").backward(grad))
    one = dict(cu_seqlens_q=torch.tensor([0, 256], dtype=torch.int32, device=dev),
               cu_seqlens_k=torch.tensor([0, 8192], dtype=torch.int32, device=dev))
    kq, kk = torch.empty(1, 256, 16, 128, device=dev, dtype=torch.bfloat16), local[1][:, :8192]
    from seqpar.kernels.dispatch import flash_attn_choice
    choice = [flash_attn_choice(kq, kk, kk, return_lse=True, **one)[0],
              flash_attn_choice(kq, kk, kk, backward=True, **one)[0]]
    return err, moved, syncs, choice


def test_kernel_speed_says_which_tasks_the_servers_run_on_cudnn():
    """What the planner is told about the servers' kernels: nothing where one kernel runs every
    task (CPU); on CUDA, where the split takes the servers' calls, its cuDNN lengths."""
    from seqpar.attention.disagg import DisaggOptions, KernelSpeed
    from seqpar.attention.disagg.runtime import kernel_speed
    from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len
    q = torch.empty(1, 64, 32, 64)
    assert kernel_speed(q, q[:, :, :8], q[:, :, :8], DisaggOptions()) is None
    if not torch.cuda.is_available():
        return
    q = q.to("cuda", torch.bfloat16)
    speed = kernel_speed(q, q[:, :, :8], q[:, :, :8], DisaggOptions(triton_cost=1.25))
    want = KernelSpeed(min_doc_len(32), max_doc_len(32, 64, 2), True, 1.25)
    assert speed == (want if _server_kernel() == "split" else None)


def _server_kernel() -> str:
    from seqpar.kernels import dispatch
    return "split" if "packed_lse" in dispatch.SPLIT_FASTER or dispatch._attn_choice() == "split" else "triton"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_disagg_across_ranks_bf16_on_two_gpus_matches_fp32():
    for err, moved, syncs, choice in run_distributed(_gpu_rows_bf16, 2, backend="nccl"):
        assert moved > 0 and err < 3e-2, f"error {err} relative to the largest value, {moved} bytes moved"
        assert choice == [_server_kernel()] * 2, choice
        assert syncs == [], syncs


def _attention_comm(rank, world):
    """dp=2 disagg over dp_cp on NCCL: the communicator ParallelDims builds for its all-to-alls."""
    import torch.distributed as dist

    from seqpar.parallel.dims import ParallelDims, attention_comm_options
    torch.cuda.set_device(rank)
    dims = ParallelDims(dp=2, cp=1, tp=1, pp=1, world_size=world, attention_dp_cp=True)
    dims.build_mesh("cuda")
    group = dims.group("attn")
    x = torch.full((world,), float(rank), device="cuda")
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return (attention_comm_options().is_high_priority_stream, group is not dims.group("dp_cp"),
            dist.get_process_group_ranks(group), out.tolist())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_disagg_communicator_runs_at_high_priority_on_nccl():
    for high, own, ranks, got in run_distributed(_attention_comm, 2, backend="nccl"):
        assert high and own and ranks == [0, 1] and got == [0.0, 1.0]


def test_step_metrics_sum_a_step_and_reset():
    from seqpar.attention.disagg import metrics
    metrics.step_metrics()
    with metrics.exposed_wait(torch.device("cpu"), "fwd_in"):  # a wait outside any call
        pass
    assert metrics.step_metrics() == {}, "no disagg call: nothing to report, and the wait is dropped"
    for before, bytes_ in ((1.5, 100), (1.1, 50)):
        metrics.record_call({"imbalance_before": before, "imbalance_after": 1.0, "tasks": 4, "plan_ms": 2.0},
                            bytes_, new=before > 1.2)
    for phase, seconds in (("bwd_in", 0.004), ("bwd_in", 0.002), ("fwd_out", 0.001)):
        with metrics.exposed_wait(torch.device("cpu"), phase):
            time.sleep(seconds)
    m = metrics.step_metrics()
    assert m["sp/attn_imbalance_before"] == pytest.approx(1.3) and m["sp/bytes_moved"] == 150
    assert m["sp/plan_ms"] == 2.0 and m["sp/disagg_calls"] == 2
    assert m["sp/exposed_fwd_in_ms"] == m["sp/exposed_bwd_out_ms"] == 0
    assert m["sp/exposed_bwd_in_ms"] >= 6 and 1 <= m["sp/exposed_fwd_out_ms"] < m["sp/exposed_max_ms"]
    assert 4 <= m["sp/exposed_max_ms"] < m["sp/exposed_bwd_in_ms"]
    assert m["sp/exposed_comm_ms"] == pytest.approx(m["sp/exposed_bwd_in_ms"] + m["sp/exposed_fwd_out_ms"])
    assert metrics.step_metrics() == {}


# ---- across data-parallel ranks (parallel.disagg.group=dp_cp): each rank its own packed row ----

ROW = 480
# rank 0 holds one long document (most of the work), the others ever more, shorter ones
ROWS = [[480], [200, 1, 279], [120] * 4, [14, 66] * 6]
# (causal, hq, hkv, schedule)
ROW_CASES = [(True, 4, 2, "ping_pong"), (False, 4, 2, "ping_pong"), (True, 2, 2, "single")]


def _across_rows(rank, world, group, sub):
    """On the first `sub` ranks (`group`): this rank's row through disagg over the group, against
    attention on the row alone."""
    from seqpar.attention.disagg import join_row_bounds
    cu = torch.tensor(_bounds(ROWS[rank], 1), dtype=torch.int32)
    joined = join_row_bounds(cu, group)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    errs = {}
    for case in ROW_CASES:
        causal, hq, hkv, schedule = case
        g = torch.Generator().manual_seed(100 * rank + hq)  # different data on every rank
        shapes = ((hq, 8), (hkv, 8), (hkv, 6))
        q, k, v = (torch.randn(1, ROW, h, d, generator=g, dtype=torch.float64) for h, d in shapes)
        grad = torch.randn(1, ROW, hq, 6, generator=g, dtype=torch.float64)
        ref_in, mine = ([t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
        ref = kernels.flash_attn(*ref_in, causal=causal, cu_seqlens=cu)  # this rank's row on its own
        ref.backward(grad)
        out = disagg_attention(*mine, group=group, causal=causal, cu_seqlens=joined, layout="contiguous",
                               min_chunk=16, schedule=schedule)
        out.backward(grad)
        errs[case] = max(rel(out, ref), *(rel(m.grad, r.grad) for m, r in zip(mine, ref_in)))
    p = plan(joined.tolist(), sub, layout="contiguous", min_chunk=16)
    moved = sum(t.q_end - t.q_start for t in p.tasks if t.owner == 0 and t.server != 0)
    try:  # rows of different lengths are not the shards of one row: every rank refuses alike
        join_row_bounds(torch.tensor([0, 5, ROW + rank], dtype=torch.int32), group)
        refused = ""
    except ValueError as e:
        refused = str(e)
    return joined.tolist(), errs, moved, (p.initial_imbalance, p.imbalance), refused


def _across_rows_worlds(rank, world):
    results = {}
    for sub in (2, world):  # a group of the first two ranks, then all of them: one process start
        group = dist.new_group(list(range(sub))) if sub < world else None  # every rank takes part in new_group
        if rank < sub:
            results[sub] = _across_rows(rank, world, group, sub)
    return results


def test_disagg_across_ranks_rows_exact():
    per_rank = run_distributed(_across_rows_worlds, 4)
    for sub in (2, 4):
        expected = _bounds([n for row in ROWS[:sub] for n in row], 1)
        for joined, errs, moved, (before, after), refused in (r[sub] for r in per_rank[:sub]):
            assert joined == expected, sub
            assert moved > 0 and after < before, f"world {sub}: rank 0's long document must lend work to others"
            for case, err in errs.items():
                assert err <= 1e-7, f"world {sub}, (causal, hq, hkv, schedule)={case}: relative error {err}"
            assert f"the rows end at {[ROW + r for r in range(sub)]}" in refused


@pytest.mark.parametrize("overrides,world,message", [
    (["parallel.disagg.group=dp"], 2, "parallel.disagg.group='dp': choose cp"),
    (["parallel.cp=2", "parallel.dp=2"], 4, "with parallel.cp=2 needs parallel.layout=contiguous (now zigzag)"),
    (["train.micro_batch_size=2"], 2, "needs train.micro_batch_size=1 (now 2)"),
])
def test_disagg_group_config_errors(overrides, world, message):
    """dp_cp (the default) joins the dp ranks' rows: its rules apply where there are dp ranks to join."""
    from seqpar.config import ConfigError, validate
    for ok in (["parallel.cp=1"], ["parallel.cp=2", "parallel.dp=2", "parallel.layout=contiguous"]):
        validate(_make_cfg("train.micro_batch_size=1", *ok), world=2 * (1 + ("parallel.cp=2" in ok)))
    with pytest.raises(ConfigError) as e:
        validate(_make_cfg("parallel.cp=1", "train.micro_batch_size=1", *overrides), world=world)
    assert message in str(e.value)


def test_disagg_group_dp_cp_is_cp_where_nothing_joins():
    """The default dp_cp asks nothing of a config with one dp rank, or whose softmax layers do not
    use disagg: zigzag with cp=2, micro-batches of 2, ring attention all validate, and the
    training loop keeps the cp group for them (joins_dp_rows)."""
    from hydra import compose, initialize_config_module
    from seqpar.attention.disagg import joins_dp_rows
    from seqpar.config import register_configs, validate
    cfg = _make_cfg("parallel.cp=2", "parallel.dp=1", "train.micro_batch_size=2", "train.global_batch_size=2")
    assert cfg.parallel.disagg.group == "dp_cp"
    validate(cfg, world=2)
    assert not joins_dp_rows(cfg.parallel, 1)
    register_configs()
    with initialize_config_module(config_module="seqpar.conf", version_base=None):
        ring = compose(config_name="train", overrides=["train.device=cpu", "parallel.softmax_sp=ring", "parallel.cp=1",
                                                       "parallel.dp=2", "train.micro_batch_size=2",
                                                       "train.global_batch_size=4"])
    validate(ring, world=2)
    assert not joins_dp_rows(ring.parallel, 2) and joins_dp_rows(_make_cfg().parallel, 2)


def test_dp_cp_training_moves_work_and_keeps_the_losses(tmp_path):
    """Short synthetic documents, two dp ranks: disagg over dp_cp really moves attention work
    between them (the embedded corpus at seq_len 64 gives one document per row: nothing to move;
    its losses are compared with the single process in test_training.py), and its losses are
    those of plain data parallelism, itself checked against the single process there."""
    from tests.test_training import LAYOUTS, _train_each
    data = ["data=synthetic", "data.mean_len=12", "data.num_tokens=65536", "data.seq_len=64", "train.steps=3"]
    runs = {"plain": LAYOUTS["dp2"][1] + data,
            "moved": LAYOUTS["dp2_disagg"][1] + data + ["parallel.disagg.min_chunk=4",
                                                        "parallel.disagg.task_overhead=0"]}
    run_distributed(_train_each, 2, [(tmp_path / name, overrides) for name, overrides in runs.items()])
    plain, moved = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                    for name in runs)
    assert all(m["sp/bytes_moved"] > 0 and m["sp/attn_imbalance_after"] < m["sp/attn_imbalance_before"]
               for m in moved), moved
    for a, b in zip(moved, plain, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (moved, plain)


# ---- the runtime's own cost: what a rank keeps is never copied, what moves is sliced, not indexed ----

def _naive_assembly(contribs, sources, rows):
    out = torch.zeros(rows, *sources[0].shape[1:], dtype=sources[0].dtype)
    for d, n, s, ss in contribs:
        out[d:d + n] += sources[s][ss:ss + n]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_assembly_gathers_and_sums_row_ranges_like_a_loop(seed):
    from seqpar.attention.disagg.routing import assembly
    rng = random.Random(seed)
    lens = [rng.randint(0, 40) for _ in range(3)]
    sources = [torch.randn(n, 2, 3, dtype=torch.float64) for n in lens]
    rows = rng.randint(1, 50)
    contribs = []
    if seed % 2:  # gather: every output row from one source row, source rows reused (keys read twice)
        d = 0
        while d < rows:
            s = rng.choice([i for i, n in enumerate(lens) if n] or [None])
            if s is None:
                break
            n = min(rng.randint(1, lens[s]), rows - d)
            ss = rng.randint(0, lens[s] - n)
            contribs.append((d, n, s, ss))
            d += n + rng.choice([0, 0, 2])  # an uncovered gap is zeros
    else:  # scatter-add: every source row at most once, output rows summed from several
        for s, n in enumerate(lens):
            ss = 0
            while ss < n:
                m = min(rng.randint(1, 12), n - ss, rows)
                contribs.append((rng.randint(0, rows - m), m, s, ss))
                ss += m + rng.choice([0, 3])
    a = assembly(contribs, lens, rows)
    expected = _naive_assembly(contribs, sources, rows)
    got = a([s.clone() for s in sources], sources[0])  # sums are added into the (owned) sources
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=0, atol=1e-12), (contribs, lens, rows)
    assert assembly([(0, lens[0], 0, 0)], lens, lens[0]).whole == 0 or lens[0] == 0, "a whole source is not copied"


class _OpCounter:
    """aten ops the disagg runtime issues (TorchDispatchMode), the attention kernels' own excluded."""

    def __init__(self, monkeypatch_module):
        from torch.utils._python_dispatch import TorchDispatchMode
        from collections import Counter
        counter = self
        self.counts, self.kernel_calls, self.paused = Counter(), 0, False
        self.bytes = Counter()  # bytes written by the row-moving ops (_COPY_OPS)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                name = func.overloadpacket.__name__
                if not counter.paused:
                    counter.counts[name] += 1
                    if name in _COPY_OPS and isinstance(result, torch.Tensor):
                        counter.bytes[name] += result.numel() * result.element_size()
                return result

        def quiet(fn):
            def call(*a, **kw):
                counter.paused, counter.kernel_calls = True, counter.kernel_calls + 1
                try:
                    return fn(*a, **kw)
                finally:
                    counter.paused = False
            return call
        for name in ("flash_attn", "flash_attn_backward"):
            setattr(monkeypatch_module, name, quiet(getattr(monkeypatch_module, name)))
        self.mode = Mode()


# ops that move or combine rows: none of them may run when nothing moves; the per-token index
# ops may never run at all (slices and one cat per buffer replace them)
_COPY_OPS = {"cat", "copy_", "clone", "_to_copy", "add_", "add", "zeros", "new_zeros", "fill_", "zero_", "stack"}
_INDEX_OPS = {"index", "index_select", "index_put", "index_put_", "_index_put_impl_", "index_add", "index_add_",
              "gather", "scatter", "scatter_", "scatter_add", "scatter_add_", "take", "masked_select"}


def _runtime_overhead(rank, world):
    from seqpar.attention.disagg import runtime
    from seqpar.kernels.flash_attn import flash_attn, flash_attn_backward
    from seqpar.parallel.traffic import count_traffic
    counter = _OpCounter(runtime)
    results = {}
    # balanced: each rank's own documents, equal work (nothing moves); then the extreme mix (much moves)
    for name, docs in (("still", [0, 100, 256, 356, 512]), ("moving", [0, 1, 9, 300, 301, 325, 512])):
        cu = torch.tensor(docs, dtype=torch.int32)
        g = torch.Generator().manual_seed(5)
        q, k, v, grad = (torch.randn(1, 512, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
        local = [shard_sequence(t, layout="contiguous").requires_grad_() for t in (q, k, v)]
        grad = shard_sequence(grad, layout="contiguous")
        counter.counts.clear()
        counter.kernel_calls = 0
        with count_traffic() as traffic, counter.mode:
            out = disagg_attention(*local, cu_seqlens=cu, layout="contiguous", min_chunk=16, schedule="ping_pong")
            out.backward(grad)
        got = [out.detach()] + [t.grad for t in local]
        if name == "still":  # the kernel pair on the rank's own rows, as its server runs them
            own = torch.tensor([b - rank * 256 for b in docs if rank * 256 <= b <= rank * 256 + 256], dtype=torch.int32)
            x = [t.detach() for t in local]
            o, lse = flash_attn(*x, cu_seqlens_q=own, cu_seqlens_k=own, return_lse=True)
            ref = [o] + list(flash_attn_backward(grad, *x, o, lse, cu_seqlens_q=own, cu_seqlens_k=own))
        else:
            ref = got
        routes, _ = runtime._plan_routes(tuple(docs), 512, world, rank, "contiguous", 0.1, 16, True,
                                         runtime.planner_overhead(runtime.current()), (4 * 14 * 8, 2 * 16 * 8), "ping_pong")
        results[name] = dict(equal=all(torch.equal(a, b) for a, b in zip(got, ref)),
                             err=max((a - b).abs().max().item() for a, b in zip(got, ref)),
                             a2a=traffic.calls["all_to_all_single"], ops=dict(counter.counts),
                             kernels=counter.kernel_calls, nanos=len(routes),
                             collective=sum(r.collective for r in routes))
    dist.barrier()
    return results


def test_disagg_runtime_copies_only_what_moves():
    for res in run_distributed(_runtime_overhead, 2):
        still, moving = res["still"], res["moving"]
        # nothing moves: one nano-batch, exactly the local kernel pair, no collective, no copy
        assert still["nanos"] == 1 and still["collective"] == 0 and still["a2a"] == 0, still
        assert still["equal"], f"a plan moving nothing must compute exactly local attention ({still['err']})"
        assert still["kernels"] == 2, still
        assert not (_COPY_OPS | _INDEX_OPS) & set(still["ops"]), str(still["ops"])
        # work moves: exact (the moved rows' results compared by the extreme-mix test), two all-to-alls
        # per direction and nano-batch with transfers, no per-token index op, at most one join per buffer
        assert moving["collective"] > 0 and moving["a2a"] == 4 * moving["collective"], moving
        assert not _INDEX_OPS & set(moving["ops"]), moving["ops"]
        # per nano-batch: fwd send, Q, K, V, outputs sent; bwd dO sent, dO, gradients sent; then out, dq, dk, dv
        assert moving["ops"].get("cat", 0) <= 8 * moving["nanos"] + 4, moving["ops"]


def _copies_before_after(rank, world):
    """The moving mix, each rank's copy bytes with server buffers built from pieces ("before":
    no slice of own rows, so no kernel writes into the final tensors) and as the runtime runs."""
    from seqpar.attention.disagg import routing, runtime
    counter = _OpCounter(runtime)
    docs = [0, 1, 9, 300, 301, 325, 512]
    cu = torch.tensor(docs, dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (torch.randn(1, 512, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
    grad = shard_sequence(grad, layout="contiguous")
    span, results = routing._span, {}
    try:
        for schedule in ("ping_pong", "halves"):
            for name, fn in (("before", lambda ranges: None), ("after", span)):
                routing._span = fn
                for cache in (runtime._plan_routes, runtime._placements, runtime._owner, runtime._device_cu):
                    cache.cache_clear()
                local = [shard_sequence(t, layout="contiguous").requires_grad_() for t in (q, k, v)]
                counter.counts.clear()
                counter.bytes.clear()
                with counter.mode:
                    out = disagg_attention(*local, cu_seqlens=cu, layout="contiguous", min_chunk=16,
                                           schedule=schedule)
                    out.backward(grad)
                routes, _ = runtime._plan_routes(tuple(docs), 512, world, rank, "contiguous", 0.1, 16, True,
                                                 runtime.planner_overhead(runtime.current()), (4 * 14 * 8, 2 * 16 * 8),
                                                 schedule)
                results[schedule, name] = dict(bytes=sum(counter.bytes.values()), per_op=dict(counter.bytes),
                                                ops=dict(counter.counts), nanos=len(routes),
                                                direct=sum((r.q_direct is not None) + (r.kv_direct is not None)
                                                           for r in routes),
                                                got=[out.detach()] + [t.grad for t in local])
    finally:
        routing._span = span
        for cache in (runtime._plan_routes, runtime._placements, runtime._owner, runtime._device_cu):
            cache.cache_clear()
    return results


def test_kernels_write_into_the_final_tensors_and_copy_less():
    res = run_distributed(_copies_before_after, 2)
    for schedule in ("ping_pong", "halves"):
        before = [r[schedule, "before"] for r in res]
        after = [r[schedule, "after"] for r in res]
        for b, a in zip(before, after):
            assert b["direct"] == 0 and a["direct"] > 0 or schedule == "halves", (b["direct"], a["direct"])
            for x, y in zip(b["got"], a["got"]):
                assert torch.allclose(x, y, rtol=0, atol=1e-12), "direct writes must not change the results"
            assert a["bytes"] <= b["bytes"], (schedule, b["per_op"], a["per_op"])
        assert sum(a["bytes"] for a in after) < sum(b["bytes"] for b in before), (schedule, before, after)
        print(f"schedule={schedule}: copy bytes per rank before {[b['bytes'] for b in before]} "
              f"after {[a['bytes'] for a in after]} (nano-batches {[a['nanos'] for a in after]}); "
              f"before {[b['per_op'] for b in before]} after {[a['per_op'] for a in after]}")


# ---- the benchmark's accounting: the call without its transfers, and its transfers alone ----

def _parts_pieces(rank, world):
    from seqpar.attention.disagg import runtime
    from seqpar.bench.disagg import TransferTrace, _collective, _fwd_bwd, _no_transfer
    from seqpar.parallel.traffic import count_traffic
    docs = [0, 1, 9, 300, 301, 325, 512]
    cu = torch.tensor(docs, dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q, k, v, grad = (shard_sequence(torch.randn(1, 512, h, 8, generator=g, dtype=torch.float64), layout="contiguous")
                     for h in (4, 2, 2, 4))
    calls = []
    kernels_ = {name: getattr(runtime, name) for name in ("flash_attn", "flash_attn_backward")}

    def counted(name):
        def call(*a, **kw):
            calls.append(name)
            return kernels_[name](*a, **kw)
        return call
    results = {}
    try:
        for name in kernels_:
            setattr(runtime, name, counted(name))
        for schedule in ("ping_pong", "halves", "single"):
            fn = lambda *x: disagg_attention(*x, cu_seqlens=cu, layout="contiguous", min_chunk=16, schedule=schedule)
            res = {}
            for mode, swap in (("whole", None), ("compute", _no_transfer), ("trace", TransferTrace())):
                calls.clear()
                with count_traffic() as traffic:
                    if swap is None:
                        out = _fwd_bwd(fn, q, k, v, grad)
                    else:
                        with _collective(swap):
                            out = _fwd_bwd(fn, q, k, v, grad)
                res[mode] = dict(a2a=traffic.calls["all_to_all_single"], bytes=traffic.bytes["all_to_all_single"],
                                 kernels=list(calls), shape=tuple(out.shape))
                if mode == "trace":
                    with count_traffic() as traffic:
                        swap.replay(q.device)()
                    res["replay"] = dict(a2a=traffic.calls["all_to_all_single"],
                                         bytes=traffic.bytes["all_to_all_single"],
                                         waits=sum(kind == "wait" for kind, _ in swap.events))
            results[schedule] = res
    finally:
        for name, fn in kernels_.items():
            setattr(runtime, name, fn)
    dist.barrier()
    return results


def test_bench_parts_are_the_call_without_transfers_and_its_transfers_alone():
    for res in run_distributed(_parts_pieces, 2):
        for schedule, r in res.items():
            whole, compute, trace, replay = r["whole"], r["compute"], r["trace"], r["replay"]
            assert whole["a2a"] > 0, "the mix must move work, or this test proves nothing"
            # compute only: the same kernels in the same order, no collective
            assert compute["a2a"] == 0 and compute["kernels"] == whole["kernels"], (schedule, compute, whole)
            # recording does not change the call; the replay issues exactly its collectives, each waited for
            assert trace["a2a"] == whole["a2a"] and trace["bytes"] == whole["bytes"], (schedule, trace, whole)
            assert replay["a2a"] == whole["a2a"] and replay["bytes"] == whole["bytes"], (schedule, replay, whole)
            assert replay["waits"] == whole["a2a"], replay


def test_bench_summary_takes_parts_from_the_same_batches():
    from seqpar.bench.disagg import hidden_fraction, summarize
    base = dict(balanced_ideal_ms=100.0, dp_no_rebalance_ms=150.0, ring_ms=160.0, per_doc_cp_ms=110.0,
                disagg_no_pingpong_ms=120.0)
    rows = [dict(base, disagg_ms=200.0, disagg_compute_only_ms=190.0, disagg_comm_only_ms=20.0, disagg_collectives=8,
                 disagg_waited_ms=10.0),
            dict(base, disagg_ms=50.0, disagg_compute_only_ms=50.0, disagg_comm_only_ms=0.0, disagg_collectives=0,
                 disagg_waited_ms=0.0),
            dict(base, disagg_ms=60.0, disagg_waited_ms=30.0)]  # a batch without parts
    s = summarize(rows)
    assert s["disagg_ms"] == pytest.approx(310 / 3)  # the whole: every batch
    # parts: only the batch that timed them and moved work, against its own whole
    assert s["disagg_parts_batches"] == 1 and s["disagg_parts_ms"] == 200.0
    assert s["disagg_compute_only_ms"] == 190.0 and s["disagg_exposed_comm_ms"] == 10.0
    # hidden: 1 - waited / comm alone, over the same batch (not the batch without parts)
    assert s["disagg_hidden_fraction"] == pytest.approx(0.5) == hidden_fraction(10.0, 20.0)
    assert "disagg_no_pingpong_hidden_fraction" not in s
    assert hidden_fraction(0.0, 0.0) is None


def test_one_task_server_call_goes_to_the_triton_kernel(monkeypatch):
    """A server with one task calls varlen attention on one document with its lse: torch's kernel
    for that is FA2 varlen (slower, and a host sync for the longest document), so it goes to
    Triton like packed calls; a dense call without boundaries stays with torch's kernels."""
    from seqpar.kernels import dispatch
    monkeypatch.setattr(dispatch, "triton_flash_applies", lambda q, k, v: True)
    monkeypatch.delenv(dispatch.ATTN_ENV, raising=False)
    q, k = torch.empty(1, 256, 4, 64), torch.empty(1, 512, 2, 64)
    one = dict(cu_seqlens_q=torch.tensor([0, 256]), cu_seqlens_k=torch.tensor([0, 512]))
    assert dispatch._wants_triton(q, k, k, return_lse=True, **one)
    assert dispatch._wants_triton(q, k, k, return_lse=True, cu_seqlens_q=torch.tensor([0, 100, 256]),
                                  cu_seqlens_k=torch.tensor([0, 200, 512]))
    assert not dispatch._wants_triton(q, q, q, return_lse=True), "dense rows stay with cuDNN"
    assert not dispatch._wants_triton(q, q, q), "dense rows stay with cuDNN"
    monkeypatch.setenv(dispatch.ATTN_ENV, "flash")
    assert not dispatch._wants_triton(q, k, k, return_lse=True, **one), "an explicit kernel family wins"


def test_server_boundaries_carry_their_longest_document():
    from seqpar.attention.disagg.runtime import _to_device
    t = _to_device([0, 3, 10, 10, 12], torch.device("cpu"))
    assert t.tolist() == [0, 3, 10, 10, 12] and t.seqpar_max_seqlen == 7
