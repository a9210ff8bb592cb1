"""LASP-1, LASP-2 (both schedules) and its pipelined scan against single-process lightning attention
(fp64: output and dq, dk, dv), on packed documents with awkward lengths, both layouts, worlds 1, 2
and 4; the bytes each moves per layer, which must not grow with the sequence length; and the same
Function on the Triton kernel (interpreted) that CUDA runs use.

Each world size is one spawned run that checks every case (a gloo spawn costs seconds)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import torch.distributed as dist

from seqpar import kernels
from seqpar.attention import AttnContext, linear_attention
from seqpar.attention.lasp import lasp2_attention, lasp_attention
from seqpar.attention.lasp1 import lasp1_attention
from seqpar.parallel.sharding import shard_sequence, unshard_sequence
from seqpar.parallel.traffic import count_traffic
from tests.distributed import run_distributed

SEQ = 64  # world 4 zigzag: 8 chunks of 8; contiguous: 4 chunks of 16
DOCS = {
    # 1-token documents (at the start, at a chunk edge, at the end), boundaries at chunk edges of
    # several layouts (16, 40, 48), documents crossing ranks
    "awkward": [0, 1, 13, 16, 17, 40, 48, 63, 64],
    "one": [0, 64],  # a single document through every rank
    "edges": [0, 7, 8, 9, 32, 33, 64],
    "rows": None,  # B=2 equal-length rows, no cu_seqlens
}
LOG_DECAY = [0.0, -0.01, -0.3, -2.0]  # per head: none, slow, fast, almost none carried
METHODS = {
    "lasp2": lambda *a, **kw: lasp2_attention(*a, **kw),
    "pipelined": lambda *a, **kw: lasp2_attention(*a, **kw, scan="pipelined"),
    "lasp1": lambda *a, **kw: lasp1_attention(*a, **kw),
    # the schedule that posts the all-gather before the intra-chunk work and adds the readout after
    "overlapped": lambda q, k, v, log_decay, cu_seqlens=None, layout="contiguous": lasp_attention(
        q, k, v, log_decay, group=None, cu_seqlens=cu_seqlens, scale=None, layout=layout, scan="allgather",
        overlap=True),
}
TOL = 1e-10  # relative to the largest reference value, fp64


def _inputs(docs, seed, seq=SEQ, heads=4, dk=6, dv=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B = 2 if docs is None else 1
    q = torch.randn(B, seq, heads, dk, generator=g, dtype=dtype)
    k = torch.randn(B, seq, heads, dk, generator=g, dtype=dtype)
    v = torch.randn(B, seq, heads, dv, generator=g, dtype=dtype)
    grad = torch.randn(B, seq, heads, dv, generator=g, dtype=dtype)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32)
    log_decay = torch.tensor(LOG_DECAY[:heads], dtype=dtype)
    return q, k, v, grad, log_decay, cu


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_exact(rank, world):
    errors, agree = {}, {}
    for seed, (name, docs) in enumerate(DOCS.items()):
        q, k, v, grad, log_decay, cu = _inputs(docs, seed)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = kernels.lightning_attn(*full, log_decay, cu_seqlens=cu)[0]
        ref.backward(grad)
        for layout in ("contiguous", "zigzag"):
            results = {}
            for method, fn in METHODS.items():
                local = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
                out = fn(*local, log_decay=log_decay, cu_seqlens=cu, layout=layout)
                out.backward(shard_sequence(grad, layout=layout))
                got = [unshard_sequence(out.detach(), layout=layout)] + [
                    unshard_sequence(t.grad, layout=layout) for t in local]
                want = [ref.detach()] + [t.grad for t in full]
                errors[(name, layout, method)] = max(_rel(a, b) for a, b in zip(got, want))
                results[method] = got
            agree[(name, layout)] = max(_rel(a, b) for m in ("pipelined", "lasp1", "overlapped")
                                        for a, b in zip(results[m], results["lasp2"]))
    return errors, agree


def _bytes_per_layer(method, seq, layout):
    q, k, v, grad, log_decay, _ = _inputs(None, seed=0, seq=seq, heads=2, dk=8, dv=8)
    local = [shard_sequence(t, layout=layout).requires_grad_() for t in (q, k, v)]
    with count_traffic() as traffic:
        out = METHODS[method](*local, log_decay=log_decay, layout=layout)
        out.backward(shard_sequence(grad, layout=layout))
    return traffic


def _check_traffic(rank, world):
    found = {}
    for layout in ("contiguous", "zigzag"):
        for method in METHODS:
            short, long = (_bytes_per_layer(method, seq, layout) for seq in (32, 256))
            found[(layout, method)] = (short.total_bytes, long.total_bytes, dict(long.calls))
        # the counter itself must see traffic that grows with the sequence: gather the keys
        k = torch.zeros(1, 256, 2, 8, dtype=torch.float64)
        with count_traffic() as short:
            unshard_sequence(shard_sequence(k[:, :32], layout=layout), layout=layout)
        with count_traffic() as long:
            unshard_sequence(shard_sequence(k, layout=layout), layout=layout)
        found[(layout, "kv_allgather")] = (short.total_bytes, long.total_bytes, dict(long.calls))
    return found


def _check_dispatch(rank, world):
    """The calls each (parallel.linear_sp, parallel.linear_scan) makes through the model's entry point."""
    q, k, v, grad, log_decay, _ = _inputs(None, seed=0, heads=2, dk=8, dv=8)
    calls = {}
    for sp, scan in (("lasp2", "allgather"), ("lasp2", "pipelined"), ("lasp1", "allgather")):
        ctx = AttnContext(group=dist.group.WORLD, layout="zigzag", linear_sp=sp, linear_scan=scan)
        local = [shard_sequence(t, layout="zigzag").requires_grad_() for t in (q, k, v)]
        with count_traffic() as traffic:
            linear_attention(*local, log_decay, ctx).backward(shard_sequence(grad, layout="zigzag"))
        calls[(sp, scan)] = dict(traffic.calls)
    return calls


def _check_chain_cache(rank, world):
    """A layer's chain (carry, gather weights) is built once per geometry and decay tensor, and
    again when the tensor changes in place: the second call's error against the reference."""
    from seqpar.attention import lasp

    q, k, v, grad, log_decay, cu = _inputs(DOCS["one"], seed=5)  # one document: every chunk carries
    local = [shard_sequence(t, layout="zigzag") for t in (q, k, v)]
    run = lambda: unshard_sequence(lasp2_attention(*local, log_decay=log_decay, cu_seqlens=cu,  # noqa: E731
                                                   layout="zigzag"), layout="zigzag")
    run()
    geo = next(iter(lasp._CHAINS[log_decay].values()))[0]
    reused = lasp._chain(geo, rank, log_decay) is lasp._chain(geo, rank, log_decay)
    log_decay.mul_(2.0)  # the same tensor, other decays: the cached chain must not answer
    ref = kernels.lightning_attn(q, k, v, log_decay, cu_seqlens=cu)[0]
    return reused, _rel(run(), ref)


def _check_all(rank, world):
    if world == 1:
        return _check_exact(rank, world), {}, {}
    return (_check_exact(rank, world), _check_traffic(rank, world), _check_dispatch(rank, world),
            _check_chain_cache(rank, world))


@pytest.fixture(scope="module")
def results():
    """One spawned run per world size, shared by the tests below."""
    cache = {}

    def run(world):
        if world not in cache:
            cache[world] = run_distributed(_check_all, world)
        return cache[world]
    return run


@pytest.mark.parametrize("world", [1, 2, 4])
def test_lasp_matches_single_process(world, results):
    for (errors, agree), *_ in results(world):
        for case, err in errors.items():
            assert err <= TOL, f"world={world} {case}: relative error {err:.3g}"
        for case, err in agree.items():
            assert err <= TOL, f"world={world} {case}: pipelined/lasp1 differ from lasp2 by {err:.3g}"


@pytest.mark.parametrize("world", [2, 4])
def test_bytes_per_layer_do_not_grow_with_sequence(world, results):
    for rank, (_, found, *_) in enumerate(results(world)):
        for (layout, method), (short, long, calls) in found.items():
            if method == "kv_allgather":
                assert long == 8 * short > 0, (world, rank, layout, calls)
                continue
            assert long == short > 0, f"world={world} rank={rank} {layout} {method}: {short} -> {long} bytes"
            if method in ("lasp2", "overlapped"):  # one all-gather forward, its mirror backward, nothing else
                assert len(calls) == 1 and set(calls) <= {"all_gather_single", "all_gather_into_tensor"}, calls
                assert sum(calls.values()) == 2, calls
            else:
                assert set(calls) <= {"isend", "irecv"}, calls


def test_context_picks_method_and_scan(results):
    for _, _, calls, _ in results(2):
        assert set(calls[("lasp2", "allgather")]) <= {"all_gather_single", "all_gather_into_tensor"}
        # zigzag over 2 ranks: each rank sends one hop forward and one backward; pipelined cuts
        # each hop's state into PIPELINE_BLOCKS messages along Dv (8 columns -> 4 blocks of 2)
        assert calls[("lasp1", "allgather")] == {"isend": 2, "irecv": 2}
        assert calls[("lasp2", "pipelined")] == {"isend": 8, "irecv": 8}


@pytest.mark.parametrize("world", [2, 4])
def test_chains_are_cached_and_rebuilt_when_the_decays_change(world, results):
    for *_, (reused, err) in results(world):
        assert reused and err <= TOL, (world, reused, err)


def _check_triton():
    """World 1 on the Triton kernel, fp32: zigzag (two local chunks and the local chain) and
    contiguous (one chunk, nothing exchanged)."""
    from seqpar.kernels.lightning_attn.reference import lightning_attn_reference
    from seqpar.kernels.lightning_attn.triton import lightning_attn_triton
    kernels.lightning_attn = lightning_attn_triton  # what dispatch picks on CUDA
    q, k, v, grad, log_decay, cu = _inputs([0, 1, 31, 32, 33, 90, 127, 128], seed=0, seq=128, heads=2, dk=16, dv=16,
                                          dtype=torch.float32)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = lightning_attn_reference(*full, log_decay, cu_seqlens=cu)[0]
    ref.backward(grad)
    # contiguous on one rank: its one chunk receives nothing, so the kernel runs without entering
    # states (ChunkChain.receives)
    for overlap, layout in ((True, "zigzag"), (False, "zigzag"), (False, "contiguous")):
        local = [t.clone().requires_grad_() for t in (q, k, v)]
        out = lasp_attention(*local, log_decay, group=None, cu_seqlens=cu, scale=None, layout=layout,
                             scan="allgather", overlap=overlap)
        out.backward(grad)
        err = max(_rel(a, b) for a, b in zip([out] + [t.grad for t in local], [ref] + [t.grad for t in full]))
        assert err < 1e-5, (overlap, layout, err)


def test_a_rank_that_receives_nothing_ends_the_collective_before_its_passes():
    """`_Then.wait` of a rank whose chunks receive no state gives None (zeros, no fold) but first
    ends the collective: left running behind the kernel's passes, this rank's NCCL kernel waited
    for free SMs and held the other ranks back (2 H100, 256k contiguous: 12.98 against ~11 ms)."""
    from seqpar.attention.lasp import _Then
    calls = []

    class Pending:
        def wait(self):
            calls.append("wait")
            return "answer"

        def settle(self):
            calls.append("settle")

    assert _Then(Pending(), lambda x: x + "!", True).wait() == "answer!" and calls == ["wait"]
    calls.clear()
    then = _Then(Pending(), lambda x: x + "!", False)
    assert then.wait() is None and calls == ["settle"]


def test_lasp_on_the_triton_kernel():
    """The kernel returns views, takes initial states and final-state gradients: the GPU path's
    plumbing, run in a fresh process with TRITON_INTERPRET=1 (set before triton is imported)."""
    pytest.importorskip("triton")
    run = subprocess.run([sys.executable, "-c", "from tests.test_lasp import _check_triton; _check_triton()"],
                         env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0, run.stderr[-3000:]


def _lasp2_bf16_on_nccl(rank, world):
    """LASP-2 on the Triton kernel, bf16, against the float64 reference on the whole sequence; then
    the next layer's call, which must not wait for the GPU on the host."""
    from tests.test_ring import _host_syncs
    errors = {}
    for docs in (None, [0, 1, 700, 701, 1800, 3001, 4096]):
        q, k, v, grad, _, cu = _inputs(docs, seed=3, seq=4096, heads=4, dk=64, dv=64)
        q, k, v, grad = (t.bfloat16().double() for t in (q, k, v, grad))  # bf16 holds the inputs exactly
        log_decay = -torch.linspace(1, 8, 4, dtype=torch.float64).exp2().reciprocal()
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = kernels.lightning_attn(*full, log_decay, cu_seqlens=cu)[0]
        ref.backward(grad)
        cu_d = None if cu is None else cu.cuda()
        lam = log_decay.float().cuda()
        for layout in ("contiguous", "zigzag"):
            cut = lambda t: shard_sequence(t, layout=layout).cuda().bfloat16()  # noqa: E731
            local = [cut(t).requires_grad_() for t in (q, k, v)]
            out = lasp2_attention(*local, log_decay=lam, cu_seqlens=cu_d, layout=layout)
            out.backward(cut(grad))
            got = [unshard_sequence(t.double(), layout=layout).cpu() for t in (out.detach(), *(t.grad for t in local))]
            want = [ref.detach()] + [t.grad for t in full]
            errors[(docs is not None, layout)] = max(_rel(a, b) for a, b in zip(got, want))
            again, g = [t.detach().requires_grad_() for t in local], cut(grad)
            errors[(docs is not None, layout, "host syncs")] = _host_syncs(
                lambda: lasp2_attention(*again, log_decay=lam, cu_seqlens=cu_d, layout=layout).backward(g))
    return errors


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_lasp2_bf16_on_nccl_against_fp64():
    for errors in run_distributed(_lasp2_bf16_on_nccl, 2, backend="nccl"):
        for case, err in errors.items():
            if case[-1] == "host syncs":
                assert err == [], (case, err)
            else:
                assert err < 1e-2, (case, err)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_receives_says_where_the_scan_brings_a_nonzero_state(world):
    """`ChunkChain.receives` (host only) against the scan's weights with no decay (a_g = 1 unless a
    document starts in chunk g), masked as the exchange masks them: where it says False, the rank
    skips waiting for the collective and starts from zero, so a wrong False would be a wrong
    result. Also the cases the speed-up is for: 2 ranks, contiguous, one document."""
    from seqpar.attention.lasp import _chain, _cut

    rng = torch.Generator().manual_seed(world)
    seq = 16 * 2 * world
    cases = [None, [0, seq], [0, seq // 2, seq], [0, 1, seq - 1, seq]]
    cases += [[0, *sorted(set(torch.randint(1, seq, (n,), generator=rng).tolist())), seq] for n in (1, 2, 3, 5, 9)]
    cases += [[0, *range(16, seq, 16), seq]]  # every chunk edge of the contiguous layout (zigzag: every other)
    seen = {True: 0, False: 0}
    for layout in ("contiguous", "zigzag"):
        for bounds in cases:
            B = 2 if bounds is None else 1
            s_local = seq // world
            for rank in range(world):
                geo = _cut(world, rank, B, s_local, layout, None if bounds is None else tuple(bounds), torch.device("cpu"),
                           torch.float64)
                chain = _chain(geo, rank, torch.zeros(3, dtype=torch.float64))
                cont = torch.tensor(chain.continues, dtype=torch.float64)
                col_chunk = {r * geo.n_local + i: g for g, (r, i) in enumerate(geo.owners)}
                cols = torch.tensor([cont[col_chunk[c]] for c in range(len(geo.owners))], dtype=torch.float64)
                fwd = (_dense_weights(chain, False).abs().sum(-1) * geo.keep.view(-1, 1)).sum() > 0
                bwd = (_dense_weights(chain, True).abs().sum(-1) * cols[None, :]).sum() > 0
                assert chain.receives(False) == bool(fwd), (layout, bounds, rank)
                assert chain.receives(True) == bool(bwd), (layout, bounds, rank)
                seen[chain.receives(False)] += 1
    assert seen[False] > 0 and seen[True] > 0
    if world == 2:  # one document over 2 ranks, contiguous: rank 0 receives nothing forward, rank 1 nothing backward
        chains = [_chain(_cut(2, r, 1, seq // 2, "contiguous", (0, seq), torch.device("cpu"), torch.float64), r,
                         torch.zeros(3, dtype=torch.float64)) for r in range(2)]
        assert [(c.receives(False), c.receives(True)) for c in chains] == [(False, True), (True, False)]


def _dense_weights(chain, reverse):
    """`ChunkChain.weights` as `[n_local, n_chunks, H]`, zero in the columns it leaves out."""
    columns, index, w = chain.weights(reverse)
    assert index.tolist() == columns
    full = torch.zeros(w.shape[0], len(chain.owners), w.shape[3], dtype=w.dtype)
    full[:, columns] = w[:, :, 0, :, 0, 0]
    return full


def test_bench_lasp_rounds_take_the_median_of_each_measure(tmp_path):
    """`bench lasp --rounds R`: every measure timed once per round, in turn; a row is the median
    round of its method, beside the median one-GPU times, all rounds recorded (CPU, gloo, 2 ranks)."""
    from seqpar.bench.lasp import _median
    assert _median([3.0, 1.0, 2.0]) == 2.0 and _median([4.0, 1.0]) == 1.0 and _median([1.0, None]) is None
    assert _median([{"ms": 2}, {"ms": 1}, {"ms": 3}], key=lambda r: r["ms"]) == {"ms": 2}
    out = tmp_path / "lasp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "seqpar.bench",
           "lasp", "--out", str(out), "--tokens", "256", "--heads", "2", "--dim", "8", "--methods", "lasp2,lasp1",
           "--rounds", "3", "--iters", "1", "--warmup", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rounds"] == 3 and [r["method"] for r in result["rows"]] == ["lasp2", "lasp1"]
    for row in result["rows"]:
        assert len(row["rounds_ms"]) == len(row["rounds_single_ms"]) == 3
        assert row["ms"] == sorted(row["rounds_ms"])[1] and row["single_ms"] == sorted(row["rounds_single_ms"])[1]
        assert row["efficiency"] == pytest.approx(row["single_ms"] / (2 * row["ms"]))
