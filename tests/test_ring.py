"""Ring attention, Ulysses, usp and the merge-free all-gather against single-process attention (fp64: outputs and dq/dk/dv,
relative error <= 1e-7), their block plans, the order of transfers and compute, the per-document
zigzag layout (doc_zigzag: op, equal work, config checks, training), the doc_balanced layout
(whole documents placed for equal work, the rest cut doc_zigzag-style: op, transfers), and (gpu)
the CUDA kernel paths that return and consume the log-sum-exp."""
import contextlib
import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seqpar import kernels
from seqpar.attention import ring as ring_module
from seqpar.attention.copy_engine import ENV as TRANSPORT_ENV
from seqpar.attention.ring import (Block, doc_balanced_schedule, doc_ring_schedule, plan_blocks, ring_attention,
                                   ring_schedule)
from seqpar.attention.allgather import allgather_attention
from seqpar.attention.ulysses import ulysses_attention, usp_attention
from seqpar.kernels.flash_attn import flash_attn_backward
from seqpar.parallel.sharding import (check_layout, doc_zigzag_plan, document_plan, local_ranges, shard_sequence,
                                     unshard_sequence)
from tests.distributed import run_distributed

SEQ = 96  # 2*4 chunks of 12
DOCS = {  # packed rows: a 1-token document, boundaries on (12, 24) and off (13, 50) chunk edges,
    "docs_a": [0, 1, 13, 50, 51, 79, 96],  # documents crossing chunks and ranks
    "docs_b": [0, 24, 25, 95, 96],  # a document spanning every rank's chunks, a last 1-token one
}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}
TOL = 1e-7


def _inputs(rows, heads, seed):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = HEADS[heads]
    B = 2 if rows == "dense" else 1
    q = torch.randn(B, SEQ, hq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, SEQ, hkv, 8, generator=g, dtype=torch.float64)
    v = torch.randn(B, SEQ, hkv, 8, generator=g, dtype=torch.float64)
    grad = torch.randn(B, SEQ, hq, 8, generator=g, dtype=torch.float64)
    cu = None if rows == "dense" else torch.tensor(DOCS[rows], dtype=torch.int32)
    return q, k, v, grad, cu


def _rel_errors(fn, q, k, v, grad, cu, causal, layout, ref, group=None):
    """max |parallel - reference| / max |reference| over out, dq, dk, dv (this rank's shard)."""
    cut = lambda t: shard_sequence(t, group, layout=layout)
    local = [cut(t).requires_grad_() for t in (q, k, v)]
    out = fn(*local, group=group, causal=causal, cu_seqlens=cu, softmax_scale=0.3, layout=layout)
    out.backward(cut(grad))
    pairs = zip([out.detach()] + [t.grad for t in local], map(cut, ref))
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in pairs)


def _reference(q, k, v, grad, cu, causal):
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attn(*full, causal=causal, cu_seqlens=cu, softmax_scale=0.3)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in full]


def _cases():
    for layout in ("zigzag", "contiguous"):
        for rows in ("dense", "docs_a", "docs_b"):
            for heads in HEADS:
                for causal in (True, False):
                    yield layout, rows, heads, causal


def _ring_prefix(*args, **kwargs):
    """ring_attention with the backward's own blocks joined into calls over a prefix, as FA2 and
    Triton runs get them on CUDA (`prefix_calls_fast`; on CPU the dispatcher answers no)."""
    real = ring_module.prefix_calls_fast
    ring_module.prefix_calls_fast = lambda *_: True
    try:
        return ring_attention(*args, **kwargs)
    finally:
        ring_module.prefix_calls_fast = real


def _check_world(rank, world):
    """Every case on this rank; at world 2 also the transfer log, at world 4 Ulysses' head error."""
    from seqpar.parallel.dims import ParallelDims, cp_split
    methods = {"ring": (ring_attention, None), "ulysses": (ulysses_attention, None),
               "allgather": (allgather_attention, None)}
    if world > 1:  # usp over a real 2D split of the cp group: Ulysses degree 2, ring of world/2
        dims = ParallelDims(dp=1, cp=world, tp=1, pp=1, world_size=world, ulysses=2)
        dims.build_mesh("cpu")
        cp_group = dims.group("cp")
        assert cp_split(cp_group)[0] is not None, "ParallelDims did not register the usp split"
        methods["usp"] = (usp_attention, cp_group)
    errors = {}
    for i, (layout, rows, heads, causal) in enumerate(_cases()):
        q, k, v, grad, cu = _inputs(rows, heads, seed=i)
        ref = _reference(q, k, v, grad, cu, causal)
        for name, (fn, group) in methods.items():
            errors[(name, layout, rows, heads, causal)] = _rel_errors(fn, q, k, v, grad, cu, causal, layout, ref, group)
    for i, (layout, heads) in enumerate((lay, h) for lay in ("zigzag", "contiguous") for h in HEADS):
        # one dense row (prefix calls are varlen calls of one document: batch 1)
        q, k, v, grad = (t[:1] for t in _inputs("dense", heads, seed=100 + i)[:4])
        ref = _reference(q, k, v, grad, None, True)
        errors[("ring_prefix", layout, "dense", heads, True)] = _rel_errors(_ring_prefix, q, k, v, grad, None, True,
                                                                             layout, ref)
    extra = {2: lambda: {"order": _transfer_order(), "folds": _fold_results(), "keep": _keep_results(),
                         "tails": _tails_results()},
             4: lambda: {"heads": _ulysses_head_error(), "folds": _fold_results(),
                         "keep_usp": _keep_usp_results(*methods["usp"])}}.get(world)
    return errors, (extra() if extra else None), _doc_zigzag_results(world), _doc_balanced_results(world)


def _assert_small(errors, world):
    assert len(errors) == 24 * (3 if world == 1 else 4) + 4
    for case, err in errors.items():
        assert err <= TOL, f"world={world} {case}: relative error {err:.2e}"


def test_ring_ulysses_usp_single_process_without_a_process_group():
    _assert_small(_check_world(0, 1)[0], 1)


@pytest.fixture(scope="module", params=[2, 4])
def world_results(request):
    return request.param, run_distributed(_check_world, request.param)


def test_ring_ulysses_usp_match_single_process(world_results):
    world, results = world_results
    for errors, *_ in results:
        _assert_small(errors, world)


def _ulysses_head_error():
    q = torch.zeros(1, 8, 6, 8, dtype=torch.float64)
    try:
        ulysses_attention(q, q, q, layout="contiguous")
    except ValueError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _keeping_kv():
    os.environ[ring_module.KEEP_ENV] = "1"
    try:
        yield
    finally:
        del os.environ[ring_module.KEEP_ENV]


def _keep_results():
    """A ring of 2 keeping the peer's K/V for the backward (SEQPAR_RING_KEEP_KV=1): relative errors
    of every layout (dense and packed rows, GQA and MHA, causal or not), the doc layouts' results
    as their own checks take them, and the transfer log of one fwd+bwd."""
    errors = {}
    with _keeping_kv():
        for i, (layout, rows, heads, causal) in enumerate(_cases()):
            if heads == "mha" and rows != "dense":
                continue
            q, k, v, grad, cu = _inputs(rows, heads, seed=300 + i)
            ref = _reference(q, k, v, grad, cu, causal)
            errors[(layout, rows, heads, causal)] = _rel_errors(ring_attention, q, k, v, grad, cu, causal, layout, ref)
        return errors, _doc_zigzag_results(2), _doc_balanced_results(2), _transfer_order()


def _tails_results():
    """A ring of 2 with each pass's first call on the lead stream (`ring.Tails`, forced on: on CPU no
    stream, but the followers' results fold after the join as on CUDA), keeping the peer's K/V or
    not: relative errors per case, and the doc layouts' results."""
    errors, real = {}, ring_module.tails_overlap
    ring_module.tails_overlap = lambda *_: True
    try:
        for keep in (False, True):
            with _keeping_kv() if keep else contextlib.nullcontext():
                for i, (layout, rows, heads, causal) in enumerate(_cases()):
                    if heads == "gqa":
                        q, k, v, grad, cu = _inputs(rows, heads, seed=500 + i)
                        ref = _reference(q, k, v, grad, cu, causal)
                        errors[(keep, layout, rows, causal)] = _rel_errors(ring_attention, q, k, v, grad, cu, causal,
                                                                           layout, ref)
                docs = (_doc_zigzag_results(2), _doc_balanced_results(2)) if keep else None
    finally:
        ring_module.tails_overlap = real
    return errors, docs


def _keep_usp_results(fn, group):
    """usp at world 4 is a ring of 2 (over the Ulysses groups): keeping the peer's K/V applies there.
    Also which plans ran (`keep` of each ring call)."""
    errors, kept = {}, []
    apply = ring_module._RingAttention.apply
    ring_module._RingAttention.apply = lambda *a: (kept.append(a[4].keep), apply(*a))[1]
    try:
        with _keeping_kv():
            for i, (layout, rows, heads, causal) in enumerate(_cases()):
                if heads == "gqa" and causal:
                    q, k, v, grad, cu = _inputs(rows, heads, seed=400 + i)
                    ref = _reference(q, k, v, grad, cu, causal)
                    errors[(layout, rows)] = _rel_errors(fn, q, k, v, grad, cu, causal, layout, ref, group)
    finally:
        ring_module._RingAttention.apply = apply
    return errors, kept


def _transfer_order():
    """Log of one fwd+bwd: 'shift' when a transfer is posted, 'wait' when it is awaited, 'fwd' and
    'bwd' for each block computed; and the rows of each tensor each transfer sent."""
    log, sent = [], []
    shift, wait = ring_module.RingComm.exchange, ring_module.Pending.wait
    fwd, bwd = ring_module.flash_attn, ring_module.flash_attn_backward

    def exchange(self, send, recv):
        log.append("shift")
        sent.append([t.shape[1] for t in send])
        return shift(self, send, recv)
    ring_module.RingComm.exchange = exchange
    ring_module.Pending.wait = lambda self: (log.append("wait"), wait(self))[1]
    ring_module.flash_attn = lambda *a, **kw: (log.append("fwd"), fwd(*a, **kw))[1]
    ring_module.flash_attn_backward = lambda *a, **kw: (log.append("bwd"), bwd(*a, **kw))[1]
    try:
        q, k, v, grad, _ = _inputs("dense", "gqa", seed=0)
        local = [shard_sequence(t).requires_grad_() for t in (q, k, v)]
        ring_attention(*local).backward(shard_sequence(grad))
    finally:
        ring_module.RingComm.exchange, ring_module.Pending.wait = shift, wait
        ring_module.flash_attn, ring_module.flash_attn_backward = fwd, bwd
    return log, sent


def test_ulysses_names_the_heads_that_do_not_divide(world_results):
    world, results = world_results
    if world != 4:
        pytest.skip("checked in the world-4 run")
    messages = [extra["heads"] for _, extra, *_ in results]
    assert all(m is not None and "query heads (6)" in m for m in messages), messages


def test_transfers_are_posted_before_the_compute_they_overlap(world_results):
    world, results = world_results
    if world != 2:
        pytest.skip("checked in the world-2 run")
    log, sent = results[0][1]["order"]
    split = log.index("bwd") - 1  # the backward opens with its K/V shift
    fwd_log, bwd_log = log[:split], log[split:]
    # forward: the K/V shift goes out first and is awaited only after step 0's blocks
    assert fwd_log[0] == "shift" and fwd_log.index("wait") > fwd_log.index("fwd") and fwd_log[-1] == "fwd", fwd_log
    # backward: K/V out before the first block; the dK/dV shift home goes out before the own
    # shard's remaining blocks and is awaited after them
    assert bwd_log[:2] == ["shift", "bwd"], bwd_log
    last_shift = len(bwd_log) - 1 - bwd_log[::-1].index("shift")
    assert "bwd" in bwd_log[last_shift:] and bwd_log[-1] == "wait", bwd_log


def test_ring_of_2_keeping_the_peer_kv_matches_single_process_and_moves_no_kv_in_the_backward(world_results):
    world, results = world_results
    if world != 2:
        pytest.skip("a ring of 2 only")
    keeps = [extra["keep"] for _, extra, *_ in results]
    for errors, *_ in keeps:
        assert len(errors) == 16
        for case, err in errors.items():
            assert err <= TOL, f"keep {case}: relative error {err:.2e}"
    _assert_doc_zigzag([k[1] for k in keeps], 2)
    _assert_doc_balanced([k[2] for k in keeps], 2)
    for *_, (log, sent) in keeps:
        bwd_log = log[log.index("bwd"):]
        # the backward: the remote block, the dK/dV hop home posted, the own shard in one call, then the wait
        assert bwd_log == ["bwd", "shift", "bwd", "wait"], bwd_log


def test_ring_of_2_with_its_calls_on_two_streams_matches_single_process(world_results):
    world, results = world_results
    if world != 2:
        pytest.skip("a ring of 2 only")
    tails = [extra["tails"] for _, extra, *_ in results]
    for errors, _ in tails:
        assert len(errors) == 24
        for case, err in errors.items():
            assert err <= TOL, f"tails {case}: relative error {err:.2e}"
    _assert_doc_zigzag([t[1][0] for t in tails], 2)
    _assert_doc_balanced([t[1][1] for t in tails], 2)


def test_ring_of_2_sends_only_the_kv_rows_its_peer_reads(world_results):
    """Zigzag, causal: rank 0 holds chunks 0 and 3 of 4; rank 1 reads only chunk 0 (chunk 3 is the
    sequence's last), so rank 0's K/V shift carries half its rows; rank 1's queries (chunks 1, 2)
    see all of its rows from rank 0's chunk 3. The same in the backward's K/V shift."""
    world, results = world_results
    if world != 2:
        pytest.skip("a ring of 2 only")
    half = SEQ // 4
    for rank, (_, extra, *_) in enumerate(results):
        _, sent = extra["order"]
        want = [half, half] if rank == 0 else [2 * half, 2 * half]
        assert sent[:2] == [want, want], (rank, sent)  # the forward's one K/V shift, then the backward's
    for rank in range(2):
        held = tuple(tuple(local_ranges(64, 2, r, "zigzag")) for r in range(2))
        causal = ring_module._held_ring_plan(held, rank, None, True, False)
        assert (causal.send_len, causal.recv_len) == ((16, 32) if rank == 0 else (32, 16))
        full = ring_module._held_ring_plan(held, rank, None, False, False)
        assert (full.send_len, full.recv_len) == (32, 32)  # without a mask every row is seen


def test_usp_keeping_the_peer_kv_matches_single_process(world_results):
    world, results = world_results
    if world != 4:
        pytest.skip("usp's ring of 2 at world 4")
    for _, extra, *_ in results:
        errors, kept = extra["keep_usp"]
        assert len(kept) == 6 and all(kept), kept  # every call: a ring of 2 that kept the peer's K/V
        assert len(errors) == 6
        for case, err in errors.items():
            assert err <= TOL, f"usp keep {case}: relative error {err:.2e}"


def test_keeping_kv_plans_the_own_shard_as_one_backward_call(monkeypatch):
    S, C = 128, 32
    held = tuple(tuple(local_ranges(S, 2, r, "zigzag")) for r in range(2))
    for rank in range(2):
        split = ring_module._held_ring_plan(held, rank, None, True, False)
        kept = ring_module._held_ring_plan(held, rank, None, True, False, True)
        assert kept.keep and kept.first == [] and kept.tail == [kept.fwd_steps[0][0]]
        assert kept.backward_order() == kept.steps[1] + kept.tail
        assert sum(b.work() for b in kept.backward_order()) == sum(b.work() for b in split.backward_order())
    assert kept.tail == [Block(slice(0, 2 * C), slice(0, 2 * C), True)]
    held4 = tuple(tuple(local_ranges(S, 4, r, "zigzag")) for r in range(4))
    assert not ring_module._held_ring_plan(held4, 0, None, True, False, True).keep  # a ring of 2 only
    monkeypatch.setenv(ring_module.KEEP_ENV, "yes")
    with pytest.raises(ValueError, match="SEQPAR_RING_KEEP_KV='yes' is not one of: 0, 1"):
        ring_module.keep_kv()


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_gives_every_rank_the_same_causal_work_at_every_step(world):
    held = [local_ranges(64 * world, world, r, "zigzag") for r in range(world)]
    work = [[sum(b.work() for b in step) for step in ring_schedule(held, r, None, True)] for r in range(world)]
    assert all(len(set(step)) == 1 for step in zip(*work)), work  # every rank, the same work at each step
    # and every step the same, but for the diagonal itself (2 chunks of 32) that step 0 adds
    assert set(work[0][1:]) == {work[0][0] - 2 * 32 // 2}, work


def test_block_plan_skips_what_documents_and_causality_hide():
    q_ranges, k_ranges = [(0, 12), (84, 96)], [(12, 24), (72, 84)]  # zigzag rank 0 of 4 and rank 1
    # one document per chunk: nothing of rank 1 is visible to rank 0
    bounds = list(range(0, 97, 12))
    assert plan_blocks(q_ranges, k_ranges, bounds, causal=True) == []
    # a document spanning [20, 90): queries 84..89 see keys 20..23 and 72..83, one coalesced call
    blocks = plan_blocks(q_ranges, k_ranges, [0, 20, 90, 96], causal=True)
    assert len(blocks) == 1 and blocks[0].q == slice(12, 18) and blocks[0].k == slice(8, 24)
    assert blocks[0].work() == 6 * 16
    # non-causal, no documents: every query against every key in a single call
    assert [(b.q, b.k) for b in plan_blocks(q_ranges, k_ranges, None, causal=False)] == [(slice(0, 24), slice(0, 24))]


@pytest.mark.parametrize("world", [2, 4])
def test_backward_tail_is_one_call_over_a_prefix_where_the_kernel_takes_it(world):
    """zigzag: after the remote steps a rank's later chunk attends its earlier chunk (a full
    rectangle) and itself (a causal diagonal); with prefix calls that is one causal call of the
    chunk over both, aligned bottom-right, the same work, and its dQ rows fold one result fewer."""
    S = 64 * world
    C = S // (2 * world)
    held = tuple(tuple(local_ranges(S, world, r, "zigzag")) for r in range(world))
    for rank in range(world):
        split = ring_module._held_ring_plan(held, rank, None, True, False)
        joined = ring_module._held_ring_plan(held, rank, None, True, True)
        assert [b.causal for b in split.tail] == [False, True]
        assert joined.tail == [Block(slice(C, 2 * C), slice(0, 2 * C), True, (0, C), (0, 2 * C))]
        assert sum(b.work() for b in joined.tail) == sum(b.work() for b in split.tail)
        assert len(joined.dq.runs) == len(split.dq.runs) - 1  # one block result fewer
        if world == 2:  # the later chunk's dQ: three results (a trio) split, two (a pair) joined
            assert "trio_last" in {r.role for runs in split.dq.runs for r in runs}
            assert "trio_last" not in {r.role for runs in joined.dq.runs for r in runs}
    assert not ring_module.prefix_calls_fast(*[torch.empty(1, 8, 2, 4)] * 3)  # CPU: the reference, no join
    # documents: one document holding the whole later chunk joins too (its rectangle is that
    # document's part of the earlier chunk); a boundary inside the later chunk makes its diagonal
    # a call with bounds and its rectangle a document's rows only: nothing to join
    one = ring_module._held_ring_plan(held, 0, (0, 5, S), True, True)
    assert one.tail == [Block(slice(C, 2 * C), slice(5, 2 * C), True, (0, C), (0, 2 * C - 5))]
    cut = ring_module._held_ring_plan(held, 0, (0, 5, S - C // 2, S), True, True)
    assert cut.tail == cut.steps[0][1:]


def _copy_transport_on_gloo(rank, world):
    os.environ[TRANSPORT_ENV] = "copy"
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    try:
        ring_attention(q, q, q)
    except ValueError as e:
        return str(e)


def test_copy_transport_names_what_it_needs(monkeypatch):
    from seqpar.attention.copy_engine import transport
    monkeypatch.setenv(TRANSPORT_ENV, "shm")
    with pytest.raises(ValueError, match="SEQPAR_RING_TRANSPORT='shm' is not one of: nccl, copy"):
        transport()
    for message in run_distributed(_copy_transport_on_gloo, 2):
        assert "SEQPAR_RING_TRANSPORT=copy needs CUDA tensors and an NCCL process group" in message
        assert "not backend gloo" in message


def test_exchange_bytes_cover_every_transfer_of_a_ring_call():
    """What a copy-engine staging buffer must hold: 2-rank zigzag, 64 rows of 2 heads x 8 in bf16
    (32 bytes a row): the K/V shift moves 2 x 64 rows; the hop home carries the remote block's
    dK/dV, 64 rows from rank 0 (its later chunk saw all of rank 1's) and 32 from rank 1; a ring of
    4 sends its running sums in fp32 (twice the bytes of the shift)."""
    k = torch.empty(1, 64, 2, 8, dtype=torch.bfloat16)
    for world, rank, want in ((2, 0, 2 * 64 * 32), (2, 1, 2 * 64 * 32), (4, 0, 2 * 2 * 64 * 32)):
        held = tuple(tuple(local_ranges(64 * world, world, r, "zigzag")) for r in range(world))
        plan = ring_module._held_ring_plan(held, rank, None, True, False)
        key, nbytes, device = plan.exchange_bytes(k, k)
        assert nbytes == want and device == k.device and key[0] is plan, (world, rank, nbytes)
    two = ring_module._held_ring_plan(tuple(tuple(local_ranges(128, 2, r, "zigzag")) for r in range(2)), 1, None,
                                      True, False)
    assert [b.k.stop - b.k.start for b in two.steps[1]] == [32] and [b.k.stop - b.k.start for b in two.peer_last] == [64]


def test_own_shard_is_one_forward_call_with_documents_joined_across_the_junction():
    from seqpar.attention.ring import own_shard_block
    zigzag = [local_ranges(96, 2, r, "zigzag") for r in range(2)]  # [(0, 24), (72, 96)], [(24, 48), (48, 72)]
    dense = own_shard_block(zigzag[0], None, True)
    assert (dense.q, dense.k, dense.causal, dense.cu) == (slice(0, 48), slice(0, 48), True, None)
    assert sum(b.work() for b in ring_schedule(zigzag, 0, None, True)[0]) == dense.work()  # the same work
    bounds = [0, 1, 13, 50, 51, 79, 96]
    # rank 0: documents end between 24 and 72, so the junction cuts; [72, 79) is its own document
    assert own_shard_block(zigzag[0], bounds, True).cu == (0, 1, 13, 24, 31, 48)
    # rank 1: [13, 50) continues across the junction at 48 as one document of 26 local rows
    assert own_shard_block(zigzag[1], bounds, True).cu == (0, 26, 27, 48)
    assert own_shard_block([(72, 96), (0, 24)], bounds, True) is None  # out of order: step 0's blocks stay


def test_allgather_plan_moves_only_the_rows_a_rank_sees_and_calls_once_per_range():
    from seqpar.attention.allgather import gather_plan
    rows = lambda segs: [(s.owner, s.start, s.stop) for s in segs]  # noqa: E731
    blocks = lambda bs: [(b.q, b.k, b.causal, b.cu, b.cu_k) for b in bs]  # noqa: E731
    r0, r1 = gather_plan(96, 96, 2, "zigzag", (0, 96), True)
    # rank 0 ([0, 24), [72, 96)): the backward's calls, one per range over its whole prefix
    assert blocks(r0.calls) == [(slice(0, 24), slice(0, 24), True, (0, 24), (0, 24)),
                                (slice(24, 48), slice(0, 96), True, (0, 24), (0, 96))] and r0.remote == [False, True]
    # the forward runs the first chunk and the last one's own keys while rank 1's rows arrive, then
    # the last chunk against the rows before it, merged
    assert blocks(r0.fwd_first) == [(slice(0, 24), slice(0, 24), True, (0, 24), (0, 24)),
                                    (slice(24, 48), slice(72, 96), True, (0, 24), (0, 24))]
    assert [(blocks([b])[0], m) for b, m in r0.fwd_then] == [((slice(24, 48), slice(0, 72), False, (0, 24), (0, 72)),
                                                             True)]
    assert rows(r0.recv) == [(1, 24, 48), (1, 48, 72)]
    # rank 1 ([24, 48), [48, 72): one range) sees nothing after row 72: it receives rank 0's first chunk
    # only, and attends its own rows first
    assert blocks(r1.calls) == [(slice(0, 48), slice(0, 72), True, (0, 48), (0, 72))]
    assert rows(r1.recv) == [(0, 0, 24)] and (r1.lo, r1.hi) == (0, 72)
    assert blocks(r1.fwd_first) == [(slice(0, 48), slice(24, 72), True, (0, 48), (0, 48))]
    assert blocks([b for b, _ in r1.fwd_then]) == [(slice(0, 48), slice(0, 24), False, (0, 48), (0, 24))]
    # contiguous: rank 0 receives nothing at all; documents that stay on a rank move nothing
    c0, c1 = gather_plan(96, 96, 2, "contiguous", (0, 96), True)
    assert c0.recv == [] and rows(c1.recv) == [(0, 0, 48)]
    d0, d1 = gather_plan(96, 96, 2, "contiguous", (0, 40, 48, 96), True)
    assert d0.recv == d1.recv == [] and not any(d0.remote + d1.remote) and not d0.fwd_then + d1.fwd_then
    # a document [40, 60) across the ranks: rank 1 receives its 8 rows of rank 0; the forward's far
    # part is that document's 12 queries against them
    e0, e1 = gather_plan(96, 96, 2, "contiguous", (0, 40, 60, 96), True)
    assert rows(e1.recv) == [(0, 40, 48)] and (e1.lo, e1.hi) == (40, 96)
    assert blocks(e1.calls) == [(slice(0, 48), slice(0, 56), True, (0, 12, 48), (0, 20, 56))]
    assert blocks([b for b, _ in e1.fwd_then]) == [(slice(0, 12), slice(0, 8), False, (0, 12), (0, 8))]
    assert blocks(e1.fwd_first) == [(slice(0, 48), slice(8, 56), True, (0, 12, 48), (0, 12, 48))]
    # non-causal: a rank's queries see their whole documents, later rows included; no split
    n0, _ = gather_plan(96, 96, 2, "contiguous", (0, 40, 60, 96), False)
    assert rows(n0.recv) == [(1, 48, 60)] and [m for _, m in n0.fwd_then] == [False]
    # a remote segment is cut where a call's keys end, so each call's dK/dV covers it whole or not
    z = gather_plan(96, 96, 4, "zigzag", (0, 96), True)[1]  # chunks of 12: [12, 24), [72, 84)
    assert all(not (s.start < z.lo + b.k.stop < s.stop) for s in z.recv for b in z.calls)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_backward_from_merged_out_and_lse_matches_autograd(causal):
    g = torch.Generator().manual_seed(1)
    lq, lk = [1, 5, 9, 3], [4, 5, 2, 3]  # Lq < Lk, ==, > (rows that see nothing when causal)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lq, lk))
    q = torch.randn(1, sum(lq), 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, sum(lk), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(1, sum(lq), 6, 8, generator=g, dtype=torch.float64)
    out, lse = kernels.flash_attn(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    out.backward(dout)
    grads = flash_attn_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), causal=causal,
                                cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for ours, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(ours, t.grad, rtol=1e-12, atol=1e-12)


# ---- doc_zigzag: every document cut into 2N pieces, rank r holding pieces r and 2N-1-r ----

DOC_ROWS = {  # lengths not divisible by 2N (padded), 1-token documents, one document spanning every rank
    "mixed": [0, 1, 14, 50, 51, 80, 97],
    "one_long": [0, 3, 90, 91],
    "tiny": [0, 1, 2, 2, 3, 5],  # every document shorter than 2N (mostly padding), an empty one
}


def _doc_zigzag_results(world):
    """Per case: relative error of out, dq, dk, dv (real rows, after unshard) and this rank's
    local length; plus the gradient that unshard_sequence sends back to the shard."""
    cut = lambda t, cu: shard_sequence(t, layout="doc_zigzag", cu_seqlens=cu)
    errors, lengths = {}, {}
    for i, (rows, heads, causal) in enumerate(itertools.product(DOC_ROWS, HEADS, (True, False))):
        cu = torch.tensor(DOC_ROWS[rows], dtype=torch.int32)
        g = torch.Generator().manual_seed(100 + i)
        hq, hkv = HEADS[heads]
        q, grad = (torch.randn(1, DOC_ROWS[rows][-1], hq, 8, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, DOC_ROWS[rows][-1], hkv, 8, generator=g, dtype=torch.float64) for _ in range(2))
        ref = _reference(q, k, v, grad, cu, causal)
        local = [cut(t, cu).requires_grad_() for t in (q, k, v)]
        out = ring_attention(*local, causal=causal, cu_seqlens=cu, softmax_scale=0.3, layout="doc_zigzag")
        out.backward(cut(grad, cu))
        got = [unshard_sequence(t, layout="doc_zigzag", cu_seqlens=cu) for t in [out.detach()] + [t.grad for t in local]]
        errors[(rows, heads, causal)] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
        lengths[rows] = out.shape[1]
    # unshard's backward: each rank's shard gets the sum over ranks of its rows' gradient, pads none
    cu = torch.tensor(DOC_ROWS["mixed"], dtype=torch.int32)
    x = torch.zeros(1, 97, 2, dtype=torch.float64, requires_grad=True)
    shard = cut(x, cu).detach().requires_grad_()
    unshard_sequence(shard, layout="doc_zigzag", cu_seqlens=cu).backward(torch.arange(194.0).view(1, 97, 2).double())
    expected = world * shard_sequence(torch.arange(194.0).view(1, 97, 2).double(), layout="doc_zigzag",
                                      cu_seqlens=cu, pad_value=0)
    return errors, lengths, torch.equal(shard.grad, expected)


def _assert_doc_zigzag(results, world):
    for errors, lengths, grad_ok in results:
        assert len(errors) == len(DOC_ROWS) * 4
        for case, err in errors.items():
            assert err <= TOL, f"doc_zigzag world={world} {case}: relative error {err:.2e}"
        assert grad_ok, "unshard_sequence(doc_zigzag) sent back the wrong gradient"
    # every rank holds the same number of rows: the documents padded to multiples of 2N over N ranks
    for rows, bounds in DOC_ROWS.items():
        padded = sum(-(-(b - a) // (2 * world)) * 2 * world for a, b in zip(bounds[:-1], bounds[1:]))
        want = bounds[-1] if world == 1 else padded // world  # identity at world 1
        assert {lengths[rows] for _, lengths, _ in results} == {want}, rows


def test_doc_zigzag_single_process_is_the_identity():
    x = torch.randn(1, 97, 3)
    cu = torch.tensor(DOC_ROWS["mixed"], dtype=torch.int32)
    assert shard_sequence(x, layout="doc_zigzag", cu_seqlens=cu) is x
    _assert_doc_zigzag([_doc_zigzag_results(1)], 1)


def test_doc_zigzag_matches_single_process(world_results):
    world, results = world_results
    _assert_doc_zigzag([r[2] for r in results], world)


def test_doc_zigzag_shards_and_pads_each_document():
    # 2 ranks, documents of 5 (padded to 8: pieces of 2) and 12 (pieces of 3); -1 marks padding
    x = torch.arange(17)[None]
    cu = torch.tensor([0, 5, 17])
    plan = doc_zigzag_plan(cu, 2)
    shards = [_shard_for(x, cu, r, 2) for r in range(2)]
    assert shards[0].tolist() == [[0, 1, 5, 6, 7, -1, -1, 14, 15, 16]]  # pieces 0 and 3 of each document
    assert shards[1].tolist() == [[2, 3, 8, 9, 10, 4, -1, 11, 12, 13]]  # pieces 1 and 2
    assert plan.bounds == (0, 5, 8, 20)  # the pad tail [5, 8) is a document of its own
    # step 0 of rank 0: one causal diagonal over all its rows, and the second pieces against the
    # first ones per document (document 0: pad queries see no key, real keys no query)
    assert doc_ring_schedule(plan, 0, True)[0] == [
        Block(slice(0, 10), slice(0, 10), True, (0, 2, 5, 7, 10)),
        Block(slice(5, 10), slice(0, 5), False, (0, 0, 2, 5), (0, 2, 2, 5))]
    with pytest.raises(ValueError, match="pass cu_seqlens"):
        shard_sequence(x, layout="doc_zigzag")


def _shard_for(x, cu, rank, world):
    from seqpar.parallel.sharding import _shard_documents
    return _shard_documents(x, rank, world, 1, "doc_zigzag", cu, -1)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_doc_zigzag_gives_every_rank_the_same_causal_work_whatever_the_documents(world):
    from seqpar.bench.ring import lognormal_lengths
    lens = lognormal_lengths(65536)
    padded = [-(-n // (2 * world)) * 2 * world for n in lens]
    for lengths in (padded, lens):
        bounds = list(itertools.accumulate([0] + lengths))
        plan = doc_zigzag_plan(bounds, world)
        steps = [doc_ring_schedule(plan, r, True) for r in range(world)]
        work = [[sum(b.work() for b in step) for step in rank_steps] for rank_steps in steps]
        # at most 2 kernel calls per step, for all of the documents
        assert max(len(step) for rank_steps in steps for step in rank_steps) <= 2 and len(lengths) > 10
        if lengths is padded:  # no padding to add: exactly equal work at every step
            assert all(len(set(step)) == 1 for step in zip(*work)), work
        else:  # the pad tails (< 2N tokens a document, all on the last pieces) are the only difference
            totals = [sum(w) for w in work]
            assert max(totals) / (sum(totals) / world) < 1.01, totals
    # the row-level zigzag on the same documents: the imbalance doc_zigzag removes
    held = [local_ranges(65536, world, r, "zigzag") for r in range(world)]
    zz = [sum(b.work() for step in ring_schedule(held, r, bounds, True) for b in step) for r in range(world)]
    assert max(zz) / (sum(zz) / world) > 1.1, zz


# ---- doc_balanced: whole documents placed for equal work, only the rest cut doc_zigzag-style ----

BALANCED_ROWS = {  # document lengths; what the planner makes of them at world 2 and 4 is asserted below
    "long_short": [7, 33, 600, 21, 9, 40, 12, 27, 38, 5, 16, 30, 25, 11, 36, 19, 8, 29, 14, 23, 35],  # 600 > a rank's share
    "all_short": [59, 29, 53, 31, 7, 21, 37, 36, 30, 55, 58, 24, 35, 27, 42, 18, 37, 13, 23, 13, 53, 11, 44, 56],
    "ones": [1, 1, 150, 1, 217, 1, 1, 160, 1, 90, 1, 133, 1, 1, 2, 1],  # 1-token documents stay whole
    "nothing_cut": [70, 130, 100, 100, 60, 140, 90, 110],
    "one_long": [300, 1, 2],  # at world 4 two ranks hold no whole document, only padding
    "tiny": [3, 5],  # everything cut: doc_zigzag
}


def _balanced_cu(rows):
    return torch.tensor(list(itertools.accumulate([0] + BALANCED_ROWS[rows])), dtype=torch.int32)


def _doc_balanced_results(world):
    """Per case: relative error of out, dq, dk, dv (real rows, after unshard), this rank's local
    length and the rows of each K/V message it sent; plus unshard's gradient back to the shard."""
    cut = lambda t, cu: shard_sequence(t, layout="doc_balanced", cu_seqlens=cu)
    errors, lengths, sent = {}, {}, {}
    exchange = ring_module.RingComm.exchange
    for i, (rows, causal) in enumerate(itertools.product(BALANCED_ROWS, (True, False))):
        cu = _balanced_cu(rows)
        g = torch.Generator().manual_seed(200 + i)
        hq, hkv = HEADS["gqa" if causal else "mha"]
        S = int(cu[-1])
        q, grad = (torch.randn(1, S, hq, 8, generator=g, dtype=torch.float64) for _ in range(2))
        k, v = (torch.randn(1, S, hkv, 8, generator=g, dtype=torch.float64) for _ in range(2))
        ref = _reference(q, k, v, grad, cu, causal)
        local = [cut(t, cu).requires_grad_() for t in (q, k, v)]
        log = sent[(rows, causal)] = []
        ring_module.RingComm.exchange = lambda self, snd, rcv: (log.append([t.shape[1] for t in snd]),
                                                                exchange(self, snd, rcv))[1]
        try:
            out = ring_attention(*local, causal=causal, cu_seqlens=cu, softmax_scale=0.3, layout="doc_balanced")
            out.backward(cut(grad, cu))
        finally:
            ring_module.RingComm.exchange = exchange
        got = [unshard_sequence(t, layout="doc_balanced", cu_seqlens=cu) for t in [out.detach()] + [t.grad for t in local]]
        errors[(rows, causal)] = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
        lengths[rows] = out.shape[1]
    # unshard's backward: each rank's shard gets the sum over ranks of its rows' gradient, pads none
    cu = _balanced_cu("long_short")
    full = torch.arange(2.0 * int(cu[-1]), dtype=torch.float64).view(1, -1, 2)
    shard = cut(torch.zeros_like(full), cu).requires_grad_()
    whole = unshard_sequence(shard, layout="doc_balanced", cu_seqlens=cu)
    whole.backward(full)
    round_trip = torch.equal(unshard_sequence(cut(full, cu), layout="doc_balanced", cu_seqlens=cu), full)
    grad_ok = torch.equal(shard.grad, world * shard_sequence(full, layout="doc_balanced", cu_seqlens=cu, pad_value=0))
    return errors, lengths, sent, round_trip and grad_ok


def _assert_doc_balanced(results, world):
    for errors, lengths, sent, grads_ok in results:
        assert len(errors) == len(BALANCED_ROWS) * 2
        for case, err in errors.items():
            assert err <= TOL, f"doc_balanced world={world} {case}: relative error {err:.2e}"
        assert grads_ok, "shard/unshard_sequence(doc_balanced) did not round-trip the row or its gradient"
        for rows in BALANCED_ROWS:
            if world == 1:
                assert lengths[rows] == sum(BALANCED_ROWS[rows])  # the identity
                continue
            plan = document_plan("doc_balanced", _balanced_cu(rows), world)
            assert lengths[rows] == plan.local_len
            for causal in (True, False):  # only the cut documents' rows travel, and none when nothing is cut
                msgs = sent[(rows, causal)]
                # every message is split_len rows (the forward's world - 1 K/V shifts come first), but
                # the ring of 2's: its K/V shift carries the rows of those its peer reads, its raw hop
                # home the block gradients as the kernel wrote them
                travel = msgs if world > 2 else msgs[:world - 1]
                assert (msgs == []) == (plan.split_len == 0), (rows, msgs)
                if world > 2:
                    assert all(set(m) == {plan.split_len} for m in travel), (rows, plan.split_len, msgs)
                else:
                    assert all(len(set(m)) == 1 and m[0] <= plan.split_len for m in travel), (rows, msgs)
    if world == 1:
        return
    # the cases exercise what they are named for (both cut and whole documents where it says so)
    placements = {rows: document_plan("doc_balanced", _balanced_cu(rows), world).placement for rows in BALANCED_ROWS}
    lens = lambda rows, docs: sorted(BALANCED_ROWS[rows][d] for d in docs)
    assert lens("long_short", placements["long_short"].split) == [600]
    assert placements["nothing_cut"].split == placements["all_short"].split == ()
    assert all(placements["ones"].owner[d] >= 0 for d, n in enumerate(BALANCED_ROWS["ones"]) if n == 1)
    assert placements["one_long"].split == (0,)
    if world == 4:  # there, the longer ones are cut; and every document of "tiny" (doc_zigzag itself)
        assert placements["ones"].split and len(placements["tiny"].split) == 2


def test_doc_balanced_single_process_is_the_identity():
    x = torch.randn(1, 1038, 3)
    assert shard_sequence(x, layout="doc_balanced", cu_seqlens=_balanced_cu("long_short")) is x
    _assert_doc_balanced([_doc_balanced_results(1)], 1)


def test_doc_balanced_matches_single_process(world_results):
    world, results = world_results
    _assert_doc_balanced([r[3] for r in results], world)


def test_doc_balanced_schedule_keeps_whole_documents_in_the_diagonal_call():
    # 2 ranks: the 600-token document cut (doc_zigzag's storage first), the rest whole after it
    cu = _balanced_cu("long_short")
    plan = document_plan("doc_balanced", cu, 2)
    assert plan.split_len == 300 and plan.local_len == 520
    for r in range(2):
        steps = doc_balanced_schedule(plan, r, True)
        zz = doc_ring_schedule(plan.split, r, True)
        diagonal = steps[0][0]
        # step 0: ONE causal call over the cut pieces and the whole documents, then the pieces' rectangle
        assert diagonal.q == diagonal.k == slice(0, 520) and diagonal.causal and len(steps[0]) == 2
        assert diagonal.cu[:len(zz[0][0].cu)] == zz[0][0].cu and diagonal.cu[-1] == 520
        assert steps[1:] == zz[1:]  # later steps: the doc_zigzag schedule of the cut documents alone
        # every real token of the shard comes from its document: whole ones in row order after the pieces
        source = plan.source[r]
        owned = [d for d, o in enumerate(plan.placement.owner) if o == r]
        starts = cu[:-1].tolist()
        expect = [t for d in owned for t in range(starts[d], starts[d] + BALANCED_ROWS["long_short"][d])]
        assert source[300:300 + len(expect)].tolist() == expect and (source[300 + len(expect):] == -1).all()
    nothing = document_plan("doc_balanced", _balanced_cu("nothing_cut"), 4)
    assert [len(doc_balanced_schedule(nothing, r, False)) for r in range(4)] == [1] * 4  # no ring step at all


@pytest.mark.parametrize("layout", ["doc_zigzag", "doc_balanced"])
def test_doc_layout_config_errors_name_the_supported_combination(layout):
    ok = SimpleNamespace(layout=layout, cp=2, softmax_sp="ring", pp=1, tp=1, tp_sequence_parallel=True)
    check_layout(ok, "S")
    check_layout(SimpleNamespace(**{**vars(ok), "cp": 1, "softmax_sp": "ulysses"}), "LLLS")  # cp=1: the identity
    cases = [(dict(softmax_sp="ulysses"), "S", "softmax_sp=ring"), ({}, "LLLS", "linear-attention"),
             (dict(pp=2), "S", "pp>1"), (dict(tp=2), "S", "tp_sequence_parallel=false")]
    for change, layers, message in cases:
        with pytest.raises(ValueError, match=message):
            check_layout(SimpleNamespace(**{**vars(ok), **change}), layers)
    # wired into config validation
    from seqpar.config import ConfigError, validate
    from tests.test_training import _compose
    with pytest.raises(ConfigError, match="LASP"):
        validate(_compose("parallel.cp=2", "parallel.softmax_sp=ring", f"parallel.layout={layout}",
                          "model.layer_pattern=LLLS", "run_dir=unused"), 2)


# short synthetic documents, so that windows hold several and their lengths need padding
DOC_TRAIN = ["model.layer_pattern=S", "data=synthetic", "data.mean_len=13", "data.num_tokens=4096"]


def _doc_zigzag_training(rank, world, overrides, run_dir):
    from tests.test_training import _one_step_grads, _train_each
    grads = _one_step_grads(rank, world, [overrides])[0]
    _train_each(rank, world, [(run_dir, overrides)])
    return grads


def test_doc_layouts_training_match_single_process(tmp_path):
    from seqpar.data import PackedLoader, build_dataset
    from tests.test_training import _compose
    cfg = _compose(*DOC_TRAIN, "run_dir=unused")
    batch = PackedLoader(build_dataset(cfg.data, cfg.data.seq_len), global_batch_size=4, micro_batch_size=1,
                         dp_rank=0, dp_size=1, seed=0).next_batch()
    assert any(n % 4 for mb in batch for n in torch.diff(mb.cu_seqlens).tolist())  # padding is exercised
    (ref_loss, ref_grads), = run_distributed(_doc_zigzag_training, 1, ["parallel.cp=1", *DOC_TRAIN], tmp_path / "single")
    read = lambda d: [json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    want = read("single")
    # doc_balanced on these windows: some keep every document whole, some cut one, some cut all
    for layout in ("doc_zigzag", "doc_balanced"):
        dz = ["parallel.cp=2", "parallel.softmax_sp=ring", f"parallel.layout={layout}", *DOC_TRAIN]
        for loss, grads in run_distributed(_doc_zigzag_training, 2, dz, tmp_path / layout):
            assert abs(loss - ref_loss) < 1e-12, layout  # fp64, one step
            for name, g in grads.items():
                assert torch.allclose(g, ref_grads[name], rtol=1e-9, atol=1e-12), (layout, name)
        for got, ref in zip(read(layout), want, strict=True):  # fp32, 5 steps
            assert abs(got - ref) <= 1e-5 * abs(ref), (layout, read(layout), want)


# ---- folding the blocks' results into the row buffers: element-wise work and host reads ----

FOLD_DOCS = [0, 1, 13, 50, 51, 79, 96]
_VIEWS = {"view", "_unsafe_view", "slice", "transpose", "unsqueeze", "t", "detach", "alias", "expand", "select",
          "empty", "empty_like", "new_empty", "empty_strided", "as_strided"}


class _Writes(TorchDispatchMode):
    """Bytes written by each aten op that the ring runs around its kernels (the CPU reference
    kernels' own ops are not counted: they run while `inside` is set), and host reads."""

    def __init__(self):
        super().__init__()
        self.bytes, self.host_reads, self.inside = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.host_reads += 1
        elif not self.inside and name not in _VIEWS:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.bytes[name] = self.bytes.get(name, 0) + t.numel() * t.element_size()
        return out


def _fold_run(layout, dtype, acc_dtype=None):
    """Causal fwd+bwd of ring_attention (GQA 8/2) on this rank's shard, twice (the second call is
    counted): the max relative error of out, dq, dk, dv against fp64, the bytes written per op in
    units of the local q in `dtype`, and the host reads of the counted call."""
    g = torch.Generator().manual_seed(7)
    cu = torch.tensor(FOLD_DOCS, dtype=torch.int32) if layout.startswith("doc_") else None
    B = 1 if cu is not None else 2
    q, do = (torch.randn(B, 96, 8, 16, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2))
    k, v = (torch.randn(B, 96, 2, 16, generator=g, dtype=torch.float64).to(dtype).double() for _ in range(2))
    ref = _reference(q, k, v, do, cu, True)
    cut = lambda t: shard_sequence(t, layout=layout, cu_seqlens=cu)
    whole = lambda t: unshard_sequence(t.double(), layout=layout, cu_seqlens=cu)
    counter, patched = _Writes(), {}
    for name in ("flash_attn", "flash_attn_backward"):
        fn = patched[name] = getattr(ring_module, name)

        def uncounted(*a, fn=fn, **kw):
            counter.inside += 1
            try:
                return fn(*a, **kw)
            finally:
                counter.inside -= 1
        setattr(ring_module, name, uncounted)
    if acc_dtype is not None:
        patched["_acc_dtype"] = ring_module._acc_dtype
        ring_module._acc_dtype = lambda _: acc_dtype
    try:
        for counted in (False, True):
            local = [cut(t).to(dtype).requires_grad_() for t in (q, k, v)]
            grad = cut(do).to(dtype)
            with counter if counted else contextlib.nullcontext():
                out = ring_attention(*local, cu_seqlens=cu, softmax_scale=0.3, layout=layout)
                out.backward(grad)
    finally:
        for name, fn in patched.items():
            setattr(ring_module, name, fn)
    got = [whole(out.detach())] + [whole(t.grad) for t in local]
    err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))
    unit = local[0].numel() * local[0].element_size()
    return err, {name: n / unit for name, n in counter.bytes.items()}, counter.host_reads


def _fold_results():
    # doc_balanced: nothing cut at world 2, at world 4 4 of the 6 documents (the home dK/dV partly travelled)
    layouts = ("zigzag", "doc_zigzag", "doc_balanced")
    return {(layout, str(dtype)): _fold_run(layout, dtype) for layout in layouts
            for dtype in (torch.bfloat16, torch.float32)} | {
        (layout, "float32 in float64"): _fold_run(layout, torch.float32, torch.float64) for layout in layouts}


# Bytes written around the kernels per causal bf16 fwd+bwd (GQA 8/2), in units of the local q; the
# fold plans measured 4.1 / 11.9 / 28.2 at world 1 / 2 / 4 (the worst layout and rank), the fp32
# merges before them 22.4 / 35.6 / 62.1 (zero-filled fp32 buffers, a copy per first result and an
# add per block into fp32, a cast at the end, K and V packed by cat, dK/dV widened before each hop).
FOLD_BUDGET = {1: 5, 2: 14, 4: 32}


def _assert_folds(results, world):
    for (layout, dtype), (err, writes, host_reads) in results.items():
        tol = {"torch.bfloat16": 2e-2, "torch.float32": 1e-5, "float32 in float64": 1e-5}[dtype]
        assert err < tol, (world, layout, dtype, err)
        assert host_reads == 0, (world, layout, dtype, host_reads)  # every layer after the first
        casts = {"_to_copy"} if dtype != "float32 in float64" else set()  # (that one casts each block's lse)
        assert not ({"cat", "zeros", "full", "fill_"} | casts) & set(writes), (world, layout, dtype, writes)
        if dtype == "torch.bfloat16":
            assert sum(writes.values()) <= FOLD_BUDGET[world], (world, layout, writes)


def test_ring_folds_each_result_in_place_without_zero_fill():
    _assert_folds(_fold_results(), 1)


def test_ring_folds_at_world_2_and_4(world_results):
    world, results = world_results
    for _, extra, *_ in results:
        _assert_folds(extra["folds"], world)


def test_fold_plan_writes_first_merges_middle_and_casts_last():
    from seqpar.attention.ring_fold import Run, plan_folds
    # rows 0..9 of a buffer; results reach [0, 10), [5, 10), [5, 8) in that order; nothing reaches 10..11
    folds = plan_folds([slice(0, 10), slice(5, 10), slice(5, 8)], 12, final=True)
    assert folds.runs == ((Run("put", slice(0, 5), slice(0, 5)), Run("init", slice(5, 10), slice(5, 10))),
                          (Run("add", slice(5, 8), slice(0, 3)), Run("last", slice(8, 10), slice(3, 5))),
                          (Run("last", slice(5, 8), slice(0, 3)),))
    assert folds.rest == (slice(10, 12),)
    travel = plan_folds([slice(0, 4), slice(2, 6)], 8, final=False)  # fp32 to the next rank: no cast
    assert [[r.role for r in runs] for runs in travel.runs] == [["init"], ["add", "init"]]
    assert travel.rest == (slice(6, 8),)
    # forward merges: the first result of a row is kept as it is and merged with the second
    pairs = plan_folds([slice(0, 10), slice(5, 10), slice(5, 8)], 12, final=True, pairs=True)
    assert pairs.runs[0] == (Run("put", slice(0, 5), slice(0, 5)), Run("hold", slice(5, 10), slice(5, 10)))
    assert pairs.runs[1] == (Run("pair", slice(5, 8), slice(0, 3), ((0, slice(5, 8)),)),
                             Run("pair_last", slice(8, 10), slice(3, 5), ((0, slice(8, 10)),)))
    assert pairs.runs[2] == (Run("last", slice(5, 8), slice(0, 3)),)
    assert pairs.kept == (True, False, False) and pairs.released == ((), (0,), ())
    # gradients: a row of three results keeps the first two and sums them with the third in one op
    trios = plan_folds([slice(0, 10), slice(5, 10), slice(5, 8), slice(6, 8)], 12, final=True, pairs=True,
                       trios=True)
    assert trios.runs[1] == (Run("hold", slice(5, 8), slice(0, 3)),
                             Run("pair_last", slice(8, 10), slice(3, 5), ((0, slice(8, 10)),)))
    assert trios.runs[2] == (Run("trio_last", slice(5, 6), slice(0, 1), ((0, slice(5, 6)), (1, slice(0, 1)))),
                             Run("trio", slice(6, 8), slice(1, 3), ((0, slice(6, 8)), (1, slice(1, 3)))))
    assert trios.runs[3] == (Run("last", slice(6, 8), slice(0, 2)),)
    assert trios.kept == (True, True, False, False) and trios.released == ((), (), (0, 1), ())
    assert trios.needs_acc  # rows 6..7: four results, the trio's sum runs on in acc
    # two results per row (a ring of 2): they meet in one op into the final buffer, no running sum
    two = plan_folds([slice(0, 10), slice(5, 10)], 12, final=True, pairs=True)
    assert [[r.role for r in runs] for runs in two.runs] == [["put", "hold"], ["pair_last"]]
    assert not two.needs_acc and pairs.needs_acc and folds.needs_acc and travel.needs_acc
    on_top = plan_folds([slice(0, 4), slice(2, 6)], 8, final=True, base=True)  # after the other ranks' sums
    assert [[r.role for r in runs] for runs in on_top.runs] == [["last", "add"], ["last"]]


def test_plans_and_device_bounds_are_built_once_per_sharding():
    cu = torch.tensor(FOLD_DOCS, dtype=torch.int32)
    q = torch.randn(1, 96, 2, 8, dtype=torch.float64)
    ring_module._held_ring_plan.cache_clear()
    for _ in range(3):
        ring_attention(q, q, q, cu_seqlens=cu)
    info = ring_module._held_ring_plan.cache_info()
    assert (info.misses, info.hits) == (1, 2), info
    plan = ring_module._held_ring_plan((tuple(local_ranges(96, 1, 0, "zigzag")),), 0, tuple(FOLD_DOCS), True, False,
                                       False)  # as ring_attention asks: every argument given
    assert ring_module._held_ring_plan.cache_info().hits == 3 and list(plan._bounds) == [torch.device("cpu")]
    for cu_t in plan.bounds(torch.device("cpu")).cache.values():  # the aten varlen path's max, known on the host
        from seqpar.kernels.flash_attn.aten import _max_seqlen
        counter = _Writes()
        with counter:
            got = _max_seqlen(cu_t, cu_t)
        assert got == int(torch.diff(cu_t).max()) and counter.host_reads == 0


# ---- GPU: the aten kernel paths and the NCCL ring (pytest -m gpu on the GPU machine) ----

def _gpu_case(rows, hq, hkv, seed):
    """fp64 inputs that bf16 holds exactly, so that only the kernels' own rounding is measured."""
    g = torch.Generator().manual_seed(seed)
    S, D = 2048, 128
    B = 2 if rows is None else 1
    t = [torch.randn(B, S, h, D, generator=g, dtype=torch.float64).bfloat16().double() for h in (hq, hkv, hkv, hq)]
    cu = None if rows is None else torch.tensor(rows, dtype=torch.int32)
    return t, cu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("rows", [None, [0, 1, 700, 701, 2048]])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_lse_paths_match_fp64_reference(kernel, rows, heads, causal, monkeypatch):
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", kernel)
    (q, k, v, do), cu = _gpu_case(rows, *heads, seed=0)
    ref_out, ref_lse = kernels.flash_attn(q, k, v, causal=causal, cu_seqlens=cu, return_lse=True)
    ref_grads = flash_attn_backward(do, q, k, v, ref_out, ref_lse, causal=causal, cu_seqlens=cu)
    dev = [t.cuda().bfloat16() for t in (q, k, v, do)]
    cu_d = None if cu is None else cu.cuda()
    impl = kernels.backend("flash_attn", *dev[:3], return_lse=True, causal=causal, cu_seqlens=cu_d)
    assert impl.startswith("aten_"), impl
    out, lse = kernels.flash_attn(*dev[:3], causal=causal, cu_seqlens=cu_d, return_lse=True)
    assert lse.shape == ref_lse.shape and lse.dtype == torch.float32
    assert (lse.double().cpu() - ref_lse).abs().max() < 2e-2
    assert (out.double().cpu() - ref_out).abs().max() < 3e-2
    # backward from the fp64 reference's out and lse, so only the kernel's own rounding counts
    grads = flash_attn_backward(dev[3], *dev[:3], ref_out.cuda().bfloat16(), ref_lse.float().cuda(), causal=causal,
                                cu_seqlens=cu_d)
    for ours, ref in zip(grads, ref_grads):
        assert (ours.double().cpu() - ref).abs().max() < 0.1 * max(1.0, ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefix_calls_where_the_family_takes_them(monkeypatch):
    """The ring joins its backward's own blocks into a call over a prefix only where both that
    call and the dense ones run on FA2 or Triton: not on cuDNN (top-left causal), not where auto
    dispatch would send the bounded call to the split."""
    from seqpar.kernels.dispatch import ATTN_ENV, prefix_calls_fast
    # the ring asks with its resident shards: as many keys as queries (a dense causal call with
    # more keys than queries aligns top-left in torch's kernels, so no family takes it fast)
    q = torch.randn(1, 512, 8, 128, device="cuda", dtype=torch.bfloat16)
    gqa, mha = (torch.randn(1, 512, h, 128, device="cuda", dtype=torch.bfloat16) for h in (2, 8))
    monkeypatch.setenv(ATTN_ENV, "flash")
    assert prefix_calls_fast(q, gqa, gqa) and prefix_calls_fast(q, mha, mha)
    monkeypatch.setenv(ATTN_ENV, "cudnn")
    assert not prefix_calls_fast(q, mha, mha)
    monkeypatch.setenv(ATTN_ENV, "triton")
    assert prefix_calls_fast(q, mha, mha)
    from seqpar.kernels.flash_attn import cudnn_graph
    if cudnn_graph.available():  # cuDNN's graphs align bottom-right
        monkeypatch.setenv(ATTN_ENV, "graph")
        assert prefix_calls_fast(q, gqa, gqa) and prefix_calls_fast(q, mha, mha)


def _ring_bf16_on_nccl(rank, world, transport="nccl", family=None, keep="0"):
    os.environ[TRANSPORT_ENV] = transport  # the ring's transfers: NCCL's kernels or the copy engines
    os.environ[ring_module.KEEP_ENV] = keep  # "1": a ring of 2 keeps the peer's K/V for the backward
    if family:  # the local kernel family (SEQPAR_ATTN_KERNEL), else the dispatcher's choice
        os.environ["SEQPAR_ATTN_KERNEL"] = family
    torch.manual_seed(0)
    errors = {}
    docs = [0, 1, 700, 701, 1800, 2048]  # doc_zigzag: 1-token documents and lengths that need padding
    # doc_balanced (2 or 4 ranks): the 699-, 1099- and 248-token documents cut, the 1-token ones whole
    cases = [(ring_attention, rows, layout) for rows, layout in
             ((None, "zigzag"), (docs, "zigzag"), (docs, "doc_zigzag"), (docs, "doc_balanced"))]
    cases += [(allgather_attention, rows, layout) for rows, layout in
              ((None, "zigzag"), (docs, "zigzag"), (docs, "contiguous"))]
    for fn, rows, layout in cases:
        name = f"{fn.__name__} {layout} {rows}"
        (q, k, v, do), cu = _gpu_case(rows, 8, 2, seed=1)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = kernels.flash_attn(*full, causal=True, cu_seqlens=cu)
        ref.backward(do)
        cu_d = None if cu is None else cu.cuda()
        cut = lambda t: shard_sequence(t.cuda(), layout=layout, cu_seqlens=cu_d)
        local = [cut(t).bfloat16().requires_grad_() for t in (q, k, v)]
        out = fn(*local, cu_seqlens=cu_d, layout=layout)
        out.backward(cut(do).bfloat16())
        whole = lambda t: unshard_sequence(t.double(), layout=layout, cu_seqlens=cu_d)
        got = [whole(out.detach())] + [whole(t.grad) for t in local]
        want = [ref.detach()] + [t.grad for t in full]
        errors[name] = [((a.cpu() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
        # the next layer's call (same cu_seqlens): nothing may wait for the GPU on the host
        grad = cut(do).bfloat16()
        again = [t.detach().requires_grad_() for t in local]
        errors[f"{name} host syncs"] = _host_syncs(lambda: fn(*again, cu_seqlens=cu_d, layout=layout).backward(grad))
    return errors


def _host_syncs(fn):
    """The synchronising CUDA calls `fn` makes (torch's sync debug mode, as warnings)."""
    import warnings
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # torch announces the mode itself ("... is a prototype feature ...") in a warning that names it
    return [str(w.message)[:200] for w in caught
            if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("transport,family,keep", [("nccl", None, "0"), ("copy", None, "0"), ("nccl", "triton", "0"),
                                                   ("nccl", "graph", "0"), ("nccl", "flash", "0"),
                                                   ("nccl", "flash", "1"), ("copy", "cudnn", "1")])
def test_ring_bf16_on_nccl_against_fp64(transport, family, keep):
    # ring size 4 where lent: ring-flash-attention's users saw backward precision loss at 4-8
    from seqpar.kernels.flash_attn import cudnn_graph
    if family == "graph" and not cudnn_graph.available():
        pytest.skip("cuDNN's graph family needs nvidia-cudnn-frontend")
    world = 4 if torch.cuda.device_count() >= 4 else 2
    for errors in run_distributed(_ring_bf16_on_nccl, world, transport, family, keep, backend="nccl"):
        for case, errs in errors.items():
            if case.endswith("host syncs"):
                assert errs == [], (case, errs)
            else:
                assert max(errs) < 2e-2, (case, errs)


def _cp_groups_on_nccl(rank, world):
    """The cp groups ParallelDims builds (ring alone, and USP's split), whether their NCCL streams
    run at high priority, and a ring through cp's group against one through the default group."""
    from seqpar.parallel.dims import ParallelDims
    torch.cuda.set_device(rank)
    high = lambda g: g._get_backend(torch.device("cuda")).options.is_high_priority_stream
    flags, dims = {}, None
    for ulysses in (world, 1):
        dims = ParallelDims(dp=1, cp=world, tp=1, pp=1, world_size=world, ulysses=ulysses)
        dims.build_mesh("cuda")
        names = ("cp", "cp_ulysses") if ulysses > 1 else ("cp",)
        flags.update({f"{name} (ulysses {ulysses})": high(dims.group(name)) for name in names})
    torch.manual_seed(0)
    q, k, v = (shard_sequence(torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16)) for _ in range(3))
    outs = [ring_attention(q, k, v, group=g) for g in (dims.group("cp"), None)]
    return flags, (outs[0] - outs[1]).abs().max().item()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp_groups_run_at_high_priority_on_nccl():
    """Training's cp groups get NCCL streams at high priority (`parallel.dims.attention_comm_options`):
    the ring's transfers then take the next free SMs rather than queue behind the attention kernels."""
    for flags, diff in run_distributed(_cp_groups_on_nccl, 2, backend="nccl"):
        assert all(flags.values()), flags
        assert diff == 0.0, f"the ring on the cp group differs from the default group's by {diff}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU form's refusal")
def test_ring_bench_high_comm_priority_needs_nccl(tmp_path):
    from seqpar.bench.ring import main
    with pytest.raises(SystemExit, match="--comm-priority high: needs CUDA and NCCL"):
        main(["--out", str(tmp_path / "ring.json"), "--comm-priority", "high"])


def test_ring_bench_rounds_report_medians(tmp_path):
    """`bench ring --rounds R`: a dense case's times are medians over the rounds, its efficiencies
    and exposed time recomputed from them; a failed round's row stands as it is."""
    from seqpar.bench.ring import _median_row
    rounds = [dict(S=8, kernel="flash", world=2, single_ms=s, ring_ms=r, compute_only_ms=c, ulysses_ms=u,
                   max_abs_diff_vs_single=d, efficiency=0.0, ulysses_efficiency=0.0, exposed_comm_ms=0.0)
              for s, r, c, u, d in ((10.0, 6.0, 5.0, 7.0, 1e-6), (12.0, 5.0, 4.5, 8.0, 3e-6), (11.0, 7.0, 6.0, 9.0, 2e-6))]
    row = _median_row(rounds)
    assert (row["single_ms"], row["ring_ms"], row["compute_only_ms"], row["ulysses_ms"]) == (11.0, 6.0, 5.0, 8.0)
    assert row["efficiency"] == round(11.0 / 12.0, 3) and row["ulysses_efficiency"] == round(11.0 / 16.0, 3)
    assert row["exposed_comm_ms"] == 1.0 and row["max_abs_diff_vs_single"] == 3e-6
    assert row["rounds_single_ms"] == [10.0, 12.0, 11.0] and row["rounds_ring_ms"] == [6.0, 5.0, 7.0]
    failed = dict(rounds[1], error="RuntimeError: x")
    assert _median_row([rounds[0], failed]) is failed and _median_row(rounds[:1]) is rounds[0]
    # the whole bench on CPU (gloo, reference kernels): two rounds, Ulysses beside the ring
    out = tmp_path / "ring.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "seqpar.bench",
           "ring", "--out", str(out), "--rounds", "2", "--packed-lens", "--methods", "ring", "ulysses"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    (dense,) = result["dense"]
    assert result["rounds"] == 2 and len(dense["rounds_ring_ms"]) == 2 and "ulysses_efficiency" in dense
    assert dense["ring_ms"] == min(dense["rounds_ring_ms"]) and dense["max_abs_diff_vs_single"] < 1e-5
