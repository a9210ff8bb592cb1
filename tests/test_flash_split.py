"""Split packed attention (kernels/flash_attn/split.py): long documents through the dense kernel
(cuDNN), the rest through one varlen call (Triton) with each long document cut into a
(queries, no keys) and a (no queries, keys) piece.

CPU: the boundaries' split as a pure function; the composition with the reference standing in
for both kernels, in float64, against flash_attn_reference (out, lse, gradients; causal and not;
GQA; gradients through the lse); the real Triton kernel in the interpreter as the varlen part;
the dispatch rules. CUDA (`gpu`): bf16 cuDNN + Triton against the float64 reference and the
Triton path."""

import pytest
import torch

from seqpar.kernels.flash_attn.reference import flash_attn_backward_reference, flash_attn_reference
from seqpar.kernels.flash_attn.split import SplitKernels, bucket_len, flash_attn_split, split_bounds
from tests.triton_interpreter import interp_only, run_interpreter_tests

F64 = torch.float64


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _inputs(S, Hq, Hkv, D, seed, device="cpu", dtype=F64):
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda h: torch.randn(1, S, h, D, generator=g, device=device, dtype=F64).to(dtype)  # noqa: E731
    return r(Hq), r(Hkv), r(Hkv), r(Hq)


def _rel(got, exact):
    return ((got.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- the boundaries

def _pieces(bq, bk):
    return [(q1 - q0, k1 - k0, q0, k0) for q0, q1, k0, k1 in zip(bq, bq[1:], bk, bk[1:])]


@pytest.mark.parametrize("lengths, min_len, long_idx", [
    ([1, 1, 1], 2, []),              # no long document, all of length 1
    ([10], 4, [0]),                  # the row is one long document
    ([6, 1, 2, 7], 5, [0, 3]),       # long documents first and last
    ([1, 5, 5, 1], 5, [1, 2]),       # adjacent long documents, exactly min_len
    ([3, 0, 4, 9, 0], 4, [2, 3]),    # empty documents stay short
])
def test_split_bounds_awkward_mixes(lengths, min_len, long_idx):
    bounds = _cu(lengths).tolist()
    long_docs, bq, bk = split_bounds(bounds, min_len)
    assert long_docs == [(bounds[i], bounds[i + 1]) for i in long_idx]
    assert len(bq) == len(bk) == len(bounds) + len(long_idx)
    assert bq[-1] == bk[-1] == bounds[-1] and bq[0] == bk[0] == 0
    # each long document: its queries without keys, then its keys without queries; the rest unchanged
    want = []
    for i, (a, n) in enumerate(zip(bounds, lengths)):
        want += [(n, 0, a, a), (0, n, a + n, a)] if i in long_idx else [(n, n, a, a)]
    assert _pieces(bq, bk) == want


def test_documents_beyond_the_scratch_bound_give_cudnn_their_head(monkeypatch):
    """A document past max_len stays in the Triton call, except, causal, its head of max_len
    tokens: cuDNN runs their causal square, the Triton call the tail's queries over all the keys."""
    from seqpar.kernels.flash_attn import split

    bounds = _cu([6, 1, 12, 9]).tolist()
    assert split_bounds(bounds, 5, 9)[0] == [(0, 6), (19, 28)]  # the 12-token document stays short
    assert split_bounds(bounds, 5)[0] == [(0, 6), (7, 19), (19, 28)]
    long_docs, bq, bk = split_bounds(bounds, 5, 9, cut=True)
    assert long_docs == [(0, 6), (7, 16), (19, 28)]
    assert _pieces(bq, bk) == [(6, 0, 0, 0), (0, 6, 6, 0), (1, 1, 6, 6), (9, 0, 7, 7), (3, 12, 16, 7), (9, 0, 19, 19),
                               (0, 9, 28, 19)]
    assert split_bounds(bounds, 5, 6, cut=True)[0] == [(0, 6), (7, 13), (19, 25)]
    assert split_bounds(bounds, 7, 6, cut=True)[0] == []  # a head under min_len: none
    # the bound: the cuDNN calls' tensors (ten of the query heads per token) within the scratch MiB
    monkeypatch.setenv(split.SCRATCH_ENV, "1")
    assert split.max_doc_len(4, 64, 2) == (1 << 20) // (10 * 4 * 64 * 2) == 204
    assert split.max_doc_len(4, 64, 8) == 51  # fp64, as below
    for causal, dense in ((True, [51, 50]), (False, [50])):  # the 100-token document: its head, causal
        calls = []
        _check_split(_reference_kernels(calls), [100, 5, 50], 9, 4, 4, 64, causal, F64, 1e-12, seed=4,
                     per_octave=0)
        assert [c for c in calls if c[0] == "dense"] == [("dense", n) for n in dense]
    calls = []  # GQA, buckets (the head padded with the tail's rows), a gradient through the lse
    _check_split(_reference_kernels(calls), [7, 100, 5], 9, 4, 2, 64, True, F64, 1e-12, seed=5, per_octave=4)
    _check_split(_reference_kernels(calls), [7, 100, 5], 9, 4, 2, 64, True, F64, 1e-12, seed=6, lse_loss=True)
    monkeypatch.setenv(split.SCRATCH_ENV, "lots")
    with pytest.raises(ValueError, match="SEQPAR_CUDNN_SCRATCH_MB='lots': need a positive number of MiB"):
        split.max_doc_len(4, 64, 2)


def test_task_bounds_send_square_tasks_to_cudnn():
    from seqpar.kernels.flash_attn.split import split_task_bounds

    # tasks (q, k): a whole document (5, 5), a tail piece (3 queries over 8 keys), a head piece
    # (4, 4), one too long (9, 9), one without keys (2, 0)
    bq, bk = _cu([5, 3, 4, 9, 2]).tolist(), _cu([5, 8, 4, 9, 0]).tolist()
    long_tasks, q, k = split_task_bounds(bq, bk, 4, 8)
    assert long_tasks == [(0, 5, 0, 5), (8, 12, 13, 17)]
    assert _pieces(q, k) == [(5, 0, 0, 0), (0, 5, 5, 0), (3, 8, 5, 5), (4, 0, 8, 13), (0, 4, 12, 13),
                             (9, 9, 12, 17), (2, 0, 21, 26)]
    with pytest.raises(ValueError, match="count the same documents"):
        split_task_bounds([0, 4], [0, 2, 4], 2)
    # causal: a piece of at least min_len queries over its causal prefix too (4 over 6 keys), however
    # long the prefix when its causal call (the queries after prefix % min_len blank rows) fits
    # max_len (6 over 14: 6 rows), not where it does not (6 over 13: 3 + 6 rows), never one with fewer
    # keys than queries (4 over 2)
    bq, bk = _cu([4, 6, 6, 4]).tolist(), _cu([6, 14, 13, 2]).tolist()
    assert split_task_bounds(bq, bk, 4, 8, causal=True)[0] == [(0, 4, 0, 6), (4, 10, 6, 20)]
    assert split_task_bounds(bq, bk, 4, 8)[0] == []


def test_prefix_chunks_whole_chunks_then_one_causal_call():
    from seqpar.kernels.flash_attn.split import prefix_chunks

    assert prefix_chunks(10, 10, 9) == (0, 0)  # a square: one causal call
    assert prefix_chunks(10, 28, 9) == (18, 0)  # a prefix of two chunks
    assert prefix_chunks(9, 32, 9) == (18, 5)  # 23 keys of prefix: two chunks, 5 blank rows
    assert prefix_chunks(9, 14, 9) == (0, 5)  # a prefix below a chunk: all in the causal call
    for n, m in ((2300, 7000), (5000, 70000), (4096, 4097)):
        p, f = prefix_chunks(n, m, 2048)
        assert p + f == m - n and p % 2048 == 0 and f < 2048


@pytest.mark.parametrize("prefix", ["1", "0"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq, Hkv", [(2, 2), (4, 2)])
def test_split_forward_backward_with_task_boundaries(monkeypatch, causal, Hq, Hkv, prefix):
    # a disagg server's call: square tasks (whole documents, heads of documents) and, causal with
    # SEQPAR_CUDNN_PREFIX=1, long pieces over their prefix through the dense kernel at their
    # buckets, the one at the buffer's end padded with zeros; short tail pieces, a task without keys
    # and a length-1 task through the packed one; gradients into given destinations
    from seqpar.kernels.flash_attn.split_tasks import PREFIX_ENV, split_backward, split_forward

    monkeypatch.setenv(PREFIX_ENV, prefix)

    lq, lk = [9, 3, 10, 1, 2, 11, 10, 9, 9], [9, 12, 10, 1, 0, 11, 30, 32, 14]
    g = torch.Generator().manual_seed(Hq + causal)
    q, do = (torch.randn(1, sum(lq), Hq, 8, generator=g, dtype=F64) for _ in range(2))
    k, v = (torch.randn(1, sum(lk), Hkv, 8, generator=g, dtype=F64) for _ in range(2))
    cu_q, cu_k = _cu(lq), _cu(lk)
    calls = []
    kn = _reference_kernels(calls, stateless=True)
    kw = dict(causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, min_len=9, per_octave=4)
    out, lse = split_forward(q, k, v, kernels=kn, **kw)
    ref_out, ref_lse = flash_attn_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                            return_lse=True)
    assert _rel(out, ref_out) < 1e-12 and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert _rel(torch.where(torch.isinf(lse), 0, lse), torch.where(torch.isinf(ref_lse), 0, ref_lse)) < 1e-12
    # causal, pieces over their prefix (prefix_chunks, chunks of min_len = 9 keys): 10 over 30 keys as
    # a causal call of 2 blank + 10 queries and two 10 x 9 blocks; 9 over 32 as a causal call of 5
    # blank + 9 queries and two 9 x 9 blocks; 9 over 14 as one causal call of 5 blank + 9 queries
    # (each call's queries at their bucket: 9 -> 10, 11 -> 12)
    pieces = [(12,), (10, 9), (10, 9), (14,), (10, 9), (10, 9), (14,)] if prefix == "1" else []
    squares = [(10,), (10,), (12,)] if causal else [(9,), (10,), (11,)]
    assert [c[1:] for c in calls if c[0] == "dense"] == squares + (pieces if causal else [])
    want = flash_attn_backward_reference(do, q, k, v, ref_out, ref_lse, causal=causal, cu_seqlens_q=cu_q,
                                         cu_seqlens_k=cu_k)
    dk0 = torch.randn(k.shape, generator=g, dtype=F64)
    dests = (torch.empty_like(q), dk0.clone(), dk0.clone())
    got = split_backward(do, q, k, v, out, lse, dq=dests[0], dk=dests[1], dv=dests[2], accumulate=True,
                         kernels=kn, **kw)
    assert all(a is b for a, b in zip(got, dests))
    for name, a, w in zip(("dq", "dk", "dv"), got, (want[0], want[1] + dk0, want[2] + dk0)):
        assert _rel(a, w) < 1e-12, name


def _causal_tasks_exact(lq, lk, *, seed, **kw):
    """split_forward / split_backward of causal tasks (lq queries over lk keys each; 4 query heads
    over 2 kv heads, fp64) on the reference kernels, exact against the reference; returns the
    kernels' calls."""
    from seqpar.kernels.flash_attn.split_tasks import split_backward, split_forward

    g = torch.Generator().manual_seed(seed)
    q, do = (torch.randn(1, sum(lq), 4, 8, generator=g, dtype=F64) for _ in range(2))
    k, v = (torch.randn(1, sum(lk), 2, 8, generator=g, dtype=F64) for _ in range(2))
    bounds = dict(causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk))
    calls = []
    kn = _reference_kernels(calls, stateless=True)
    out, lse = split_forward(q, k, v, kernels=kn, per_octave=4, **bounds, **kw)
    got = split_backward(do, q, k, v, out, lse, kernels=kn, per_octave=4, **bounds, **kw)
    ref_out, ref_lse = flash_attn_reference(q, k, v, return_lse=True, **bounds)
    want = flash_attn_backward_reference(do, q, k, v, ref_out, ref_lse, **bounds)
    assert _rel(out, ref_out) < 1e-12
    for name, a, w in zip(("dq", "dk", "dv"), got, want):
        assert _rel(a, w) < 1e-12, name
    return calls


def test_split_tasks_prefix_chunk_from_the_environment(monkeypatch):
    # SEQPAR_CUDNN_PREFIX_CHUNK=18 (min_len 9): 10 over 30 keys as one 10 x 18 block and a causal call
    # of 2 blank + 10 queries; 9 over 14 (5 prefix keys) one causal call; exact either way
    from seqpar.kernels.flash_attn import split_tasks
    from seqpar.kernels.flash_attn.split import prefix_chunk, runs_on_cudnn

    monkeypatch.delenv(split_tasks.PREFIX_ENV, raising=False)
    assert split_tasks.cudnn_prefix()  # on by default since ee7b846
    monkeypatch.setenv(split_tasks.PREFIX_ENV, "0")
    assert not split_tasks.cudnn_prefix()
    monkeypatch.setenv(split_tasks.PREFIX_ENV, "1")
    monkeypatch.setenv("SEQPAR_CUDNN_PREFIX_CHUNK", "18")
    assert prefix_chunk(9) == 18
    assert runs_on_cudnn(10, 30, 9, 12, True) and not runs_on_cudnn(10, 26, 9, 12, True)  # 2 / 16 blank rows
    calls = _causal_tasks_exact([10, 9], [30, 14], seed=3, min_len=9)
    assert [c[1:] for c in calls if c[0] == "dense"] == [(12,), (10, 18), (14,)]
    monkeypatch.setenv("SEQPAR_CUDNN_PREFIX_CHUNK", "0")
    with pytest.raises(ValueError, match="SEQPAR_CUDNN_PREFIX_CHUNK"):
        prefix_chunk(9)


@pytest.mark.parametrize("prefix", [True, False])
def test_split_tasks_give_cudnn_the_head_of_a_task_past_max_len(monkeypatch, prefix):
    """Causal tasks cuDNN cannot take whole (too many keys, or with pieces over a prefix too many
    queries after the prefix's blank rows for max_len): cuDNN takes the head (a square of max_len;
    over a prefix, the queries it can take), the Triton call the tail over every key; the keys both
    read get both gradients. Exact against the reference."""
    from seqpar.kernels.flash_attn import split_tasks
    from seqpar.kernels.flash_attn.split import cudnn_head

    # min_len 9, max_len 20: 25 over 40 (6 blank rows) gives 14 queries, 22 over 26 (4 blank) 16; 14
    # over 24 fits whole; 8 over 40 has too few queries
    cases = ((30, 30), (25, 40), (22, 26), (14, 24), (8, 40))
    assert [cudnn_head(n, m, 9, 20, True) for n, m in cases] == [20, 14, 16, 0, 0]
    assert cudnn_head(14, 24, 9, 20, False) == 0 and cudnn_head(30, 30, 9, 20, False) == 20
    monkeypatch.setenv(split_tasks.PREFIX_ENV, "1" if prefix else "0")
    lq, lk = [30, 14, 12, 5, 31], [30, 24, 25, 5, 40]
    _causal_tasks_exact(lq, lk, seed=7 + prefix, min_len=9, max_len=20)
    cu_q, cu_k = _cu(lq), _cu(lk)
    # the 30 square's head of 20 on cuDNN; with pieces over a prefix also its tail (10 over 30), the 14
    # over 24 and the 12 over 25 whole (1 and 4 blank rows), the 31 over 40's head (20 queries after 9
    # prefix keys) and its tail (11 over 40)
    plan = split_tasks.task_plan(tuple(cu_q.tolist()), tuple(cu_k.tolist()), 9, 20, 4, torch.device("cpu"),
                                 prefix, True)
    heads = [t[:4] for t in plan.long_tasks]
    assert heads == ([(0, 20, 0, 20), (20, 30, 0, 30), (30, 44, 30, 54), (44, 56, 54, 79), (61, 81, 84, 113),
                      (81, 92, 84, 124)] if prefix else [(0, 20, 0, 20)])


def test_split_bounds_rejects_bad_boundaries():
    for bad in ([5, 9], [0, 4, 2], [0]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            split_bounds(bad, 4)


def test_plan_reads_each_boundaries_tensor_once(monkeypatch):
    from seqpar.kernels.flash_attn import split

    cu = _cu([5, 2, 9])
    other = cu.clone()
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: (t is cu or t is other) and reads.append(t) or real(t))
    plan = split.split_plan(cu, 4, "cpu")
    assert split.split_plan(cu, 4, "cpu") is plan and len(reads) == 1
    assert split.split_plan(cu, 3, "cpu").long_docs == ((0, 5), (7, 16)) and len(reads) == 1
    assert split.split_plan(other, 4, "cpu") is plan and len(reads) == 2  # another tensor, the same values
    cu[2] = 6  # edited in place: a new version, read again
    assert split.split_plan(cu, 4, "cpu").long_docs == ((0, 5), (6, 16)) and len(reads) == 3
    monkeypatch.setattr(torch.Tensor, "tolist", real)
    assert plan.cu_q.tolist() == [0, 5, 5, 7, 16, 16] and plan.cu_k.tolist() == [0, 0, 5, 7, 7, 16]


def test_min_doc_len_env(monkeypatch):
    from seqpar.kernels.flash_attn.split import MIN_DOC_HEAD_TOKENS, MIN_DOC_LEN, min_doc_len

    monkeypatch.delenv("SEQPAR_CUDNN_DOC_MIN", raising=False)
    assert min_doc_len() == MIN_DOC_LEN
    # few query heads (a tensor-parallel rank's share): only documents of MIN_DOC_HEAD_TOKENS / heads
    assert [min_doc_len(h) for h in (32, 16, 8, 4, 3)] == [MIN_DOC_LEN] * 2 + [8192, 16384, 21846]
    assert MIN_DOC_HEAD_TOKENS == 16 * MIN_DOC_LEN  # the floor alone from 16 heads on
    monkeypatch.setenv("SEQPAR_CUDNN_DOC_MIN", "2048")
    assert min_doc_len() == min_doc_len(4) == 2048  # set: what it says, whatever the heads
    monkeypatch.setenv("SEQPAR_CUDNN_DOC_MIN", "4k")
    with pytest.raises(ValueError, match="SEQPAR_CUDNN_DOC_MIN"):
        min_doc_len()


def test_bucket_len_bounds_the_padding_and_the_plans():
    assert [bucket_len(n, 4) for n in (1, 3, 4, 5, 8, 9, 12, 13, 16, 17)] == [1, 3, 4, 5, 8, 10, 12, 14, 16, 20]
    for p in (1, 2, 16):
        lens = range(p, 70000)
        got = {n: bucket_len(n, p) for n in lens}
        assert all(n <= b <= n * (1 + 1 / p) for n, b in got.items())
        # p buckets per octave (plus the octave's end): what bounds cuDNN's plans
        assert len({b for n, b in got.items() if 4096 <= n < 8192}) <= p + 1
    assert all(bucket_len(n, 0) == n for n in (1, 4097, 99999))


def test_buckets_env(monkeypatch):
    from seqpar.kernels.flash_attn.split import BUCKETS_PER_OCTAVE, buckets_per_octave

    monkeypatch.delenv("SEQPAR_CUDNN_BUCKETS", raising=False)
    assert buckets_per_octave() == BUCKETS_PER_OCTAVE
    monkeypatch.setenv("SEQPAR_CUDNN_BUCKETS", "0")
    assert buckets_per_octave() == 0
    for bad in ("12", "-4", "x"):
        monkeypatch.setenv("SEQPAR_CUDNN_BUCKETS", bad)
        with pytest.raises(ValueError, match="SEQPAR_CUDNN_BUCKETS"):
            buckets_per_octave()


# ---------------------------------------------------------------- the composition, reference kernels

def _reference_kernels(calls, stateless=False):
    """The reference in both places, recording what each kernel was given (`stateless`: a
    backward that keeps nothing from its forward, as split_backward)."""
    def dense_fwd(q, k, v, causal, scale):
        assert q.shape[2] == k.shape[2], "the dense kernel (cuDNN) takes no GQA"
        square = k.shape[1] == q.shape[1]
        calls.append(("dense", q.shape[1]) + (() if square else (k.shape[1],)))
        return flash_attn_reference(q, k, v, causal=causal, softmax_scale=scale, return_lse=True)

    def dense_bwd(dout, q, k, v, out, lse, causal, scale):
        assert q.shape[2] == k.shape[2]
        return flash_attn_backward_reference(dout, q, k, v, out, lse, causal=causal, softmax_scale=scale)

    def packed_fwd(q, k, v, causal, cu_q, cu_k, scale):
        calls.append(("packed", cu_q.tolist(), cu_k.tolist()))
        return (*flash_attn_reference(q, k, v, causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      softmax_scale=scale, return_lse=True), ("state", cu_q.tolist()))

    def packed_bwd(dout, q, k, v, out, lse, causal, cu_q, cu_k, scale, dlse, state):
        # the forward's state comes back only to the backward over the same boundaries
        assert state is None if dlse is not None or stateless else state == ("state", cu_q.tolist())
        kw = dict(causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, softmax_scale=scale)
        if dlse is None:
            return flash_attn_backward_reference(dout, q, k, v, out, lse, **kw)
        calls.append(("packed_bwd_dlse", cu_q.tolist()))
        with torch.enable_grad():  # the reference's own autograd carries dlse
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            o, l = flash_attn_reference(*leaves, return_lse=True, **kw)
            l = torch.where(torch.isfinite(l), l, 0)
            return torch.autograd.grad((o, l), leaves, (dout, dlse))

    return SplitKernels(dense_fwd, dense_bwd, packed_fwd, packed_bwd)


def _check_split(kernels, lengths, min_len, Hq, Hkv, D, causal, dtype, tol, seed, lse_loss=False, scale=None,
                 per_octave=None):
    q, k, v, do = _inputs(sum(lengths), Hq, Hkv, D, seed)
    cu = _cu(lengths)
    weights = torch.randn(1, Hq, sum(lengths), generator=torch.Generator().manual_seed(seed), dtype=F64)

    def run(fn, leaves_dtype, **kw):
        leaves = [t.to(leaves_dtype).requires_grad_() for t in (q, k, v)]
        out, lse = fn(*leaves, causal=causal, cu_seqlens=cu, softmax_scale=scale, return_lse=True, **kw)
        loss = (out.double() * do).sum()
        if lse_loss:
            loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * weights).sum()
        return (out, lse, *torch.autograd.grad(loss, leaves))

    got = run(flash_attn_split, dtype, min_len=min_len, per_octave=per_octave, kernels=kernels)
    want = run(flash_attn_reference, F64)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        assert _rel(g, w) <= tol, f"{name}: relative error {_rel(g, w):.2e} > {tol:.0e}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq, Hkv", [(2, 2), (4, 2)])
def test_split_with_reference_kernels_equals_reference(causal, Hq, Hkv):
    # long documents first, adjacent and last, length-1 documents between them
    lengths, min_len = [12, 1, 3, 9, 9, 1, 15], 9
    calls = []
    _check_split(_reference_kernels(calls), lengths, min_len, Hq, Hkv, 8, causal, F64, 1e-12, seed=Hq + causal,
                 scale=0.3)
    assert [c for c in calls if c[0] == "dense"] == [("dense", n) for n in (12, 9, 9, 15)]
    packed = [c for c in calls if c[0] == "packed"]
    assert len(packed) == 1, "everything but the long documents in ONE varlen call"
    assert packed[0][1:] == tuple(split_bounds(_cu(lengths).tolist(), min_len)[1:])


@pytest.mark.parametrize("causal", [True, False])
def test_long_documents_run_padded_to_their_bucket(causal):
    # causal: 9 -> 10 (padded with the row's next token) and 13 -> 14 (the row's last document:
    # padded with zeros); their rows and gradients dropped; not causal: the exact lengths, since
    # real queries would see padded keys
    lengths, calls = [9, 2, 12, 1, 13], []
    _check_split(_reference_kernels(calls), lengths, 9, 4, 2, 8, causal, F64, 1e-12, seed=11, per_octave=4)
    want = (10, 12, 14) if causal else (9, 12, 13)
    assert [c for c in calls if c[0] == "dense"] == [("dense", n) for n in want]


def test_padding_is_the_rows_next_tokens_where_there_are_any():
    from seqpar.kernels.flash_attn.split import _padded

    q, k, v, _ = _inputs(20, 4, 2, 8, seed=2)
    qp, kp, vp = _padded(q, k, v, 3, 9, 8)  # [3, 9) and two more rows of the row: a view of q, kv heads repeated
    assert qp.data_ptr() == q[:, 3].data_ptr() and torch.equal(qp, q[:, 3:11])
    assert torch.equal(kp, k[:, 3:11].repeat_interleave(2, dim=2)) and torch.equal(vp, v[:, 3:11].repeat_interleave(2, 2))
    qp, kp, _ = _padded(q, k, v, 14, 20, 8)  # the row ends: zeros
    assert torch.equal(qp[:, :6], q[:, 14:]) and not qp[:, 6:].any() and not kp[:, 6:].any()


def test_padded_documents_reach_cudnn_with_one_stride_per_shape():
    # a document inside the row (a view) and one at its end (a padded copy) differ only in the
    # size-1 batch dimension's stride, which cuDNN's plan cache would tell apart
    from seqpar.kernels.flash_attn.aten import canonical_strides
    from seqpar.kernels.flash_attn.split import _padded

    q, k, v, _ = _inputs(20, 4, 4, 8, seed=2)
    inside, at_end = _padded(q, k, v, 3, 9, 8)[0], _padded(q, k, v, 14, 20, 8)[0]
    assert inside.stride() != at_end.stride()
    view = canonical_strides(inside)
    assert view.stride() == at_end.stride() == torch.empty(at_end.shape).stride()
    assert view.data_ptr() == inside.data_ptr() and torch.equal(view, inside)
    strided = q[:, :, ::2]
    assert canonical_strides(strided) is strided


def test_split_gradients_through_lse_and_rows_without_long_documents():
    calls = []
    kernels = _reference_kernels(calls)
    _check_split(kernels, [7, 2, 11, 1], 7, 4, 1, 8, True, F64, 1e-12, seed=3, lse_loss=True)
    assert ("packed_bwd_dlse", _cu([7, 2, 11, 1]).tolist()) in calls  # the whole row, original boundaries
    calls.clear()
    _check_split(kernels, [3, 2, 1], 7, 2, 2, 8, True, F64, 1e-12, seed=4)  # nothing long: the varlen call only
    assert [c[0] for c in calls] == ["packed"]
    _check_split(kernels, [20], 7, 2, 2, 8, False, F64, 1e-12, seed=5)  # one long document


def test_split_rejects_what_it_cannot_take():
    q, k, v, _ = _inputs(10, 2, 2, 8, seed=0)
    with pytest.raises(ValueError, match="ends at 9"):
        flash_attn_split(q, k, v, cu_seqlens=_cu([4, 5]), kernels=_reference_kernels([]))
    with pytest.raises(ValueError, match="B = 1"):
        flash_attn_split(q.expand(2, -1, -1, -1), k, v, cu_seqlens=_cu([4, 6]), kernels=_reference_kernels([]))


# ---------------------------------------------------------------- the Triton kernel, interpreted

def test_triton_interpreter_subprocess():
    pytest.importorskip("triton")
    run_interpreter_tests(__file__)


@interp_only
@pytest.mark.parametrize("causal, lse_loss", [(True, False), (False, False), (True, True)])
def test_interp_triton_takes_the_split_boundaries(causal, lse_loss):
    from seqpar.kernels.flash_attn.split import cudnn_triton_kernels

    # the interpreter's tiles are 32 rows: long documents over several tiles, short ones inside one;
    # lse_loss: the backward with dlse, the whole row through the Triton kernel
    ref = _reference_kernels([])
    kernels = SplitKernels(ref.dense_fwd, ref.dense_bwd, *cudnn_triton_kernels()[2:])
    _check_split(kernels, [40, 1, 3, 70, 33, 1], 33, 4, 2, 16, causal, torch.float32, 2e-5, seed=7,
                 lse_loss=lse_loss)


# ---------------------------------------------------------------- dispatch

def test_dispatch_split_rules(monkeypatch):
    from seqpar.kernels import dispatch

    x = torch.zeros(1, 10, 2, 64)
    cu, one = _cu([4, 6]), _cu([10])
    assert not dispatch.split_applies(x, x, x, cu_seqlens=cu)  # CPU: no Triton kernel
    monkeypatch.setattr(dispatch, "triton_flash_applies", lambda *a: True)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    assert dispatch.split_applies(x, x, x, cu_seqlens=cu)
    assert dispatch.split_applies(x, x, x, cu_seqlens_q=cu, cu_seqlens_k=cu)
    assert not dispatch.split_applies(x, x, x, cu_seqlens_q=cu, cu_seqlens_k=_cu([4, 6]))  # not known shared
    assert not dispatch.split_applies(x, x, x, cu_seqlens=cu, return_lse=True)
    assert not dispatch.split_applies(x, x, x, cu_seqlens=one)  # one document: the dense case
    assert not dispatch.split_applies(x, x, x)
    assert not dispatch.split_applies(x, torch.zeros(1, 12, 2, 64), x, cu_seqlens=cu)
    # the lse form (ring steps, disagg servers): task boundaries, no autograd through it
    tasks = dict(cu_seqlens_q=cu, cu_seqlens_k=_cu([7, 5]), return_lse=True)
    assert dispatch.task_split_applies(x, x, x, **tasks) and dispatch.task_split_applies(x, x, x, cu_seqlens=one,
                                                                                           return_lse=True)
    assert not dispatch.task_split_applies(x, x, x, **tasks, needs_grad=True)
    assert not dispatch.task_split_applies(x, x, x, cu_seqlens=cu)  # without lse: the autograd split's
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "split")
    assert dispatch._flash_attn_backend(x, x, x, cu_seqlens=cu) == "split"
    assert dispatch._flash_attn_backend(x, x, x, **tasks) == "split"
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "auto")
    assert dispatch._flash_attn_backend(x, x, x, **tasks) == "split"  # "packed_lse" measured faster
    monkeypatch.setattr(dispatch, "SPLIT_FASTER", frozenset({"packed"}))
    assert dispatch._flash_attn_backend(x, x, x, **tasks) != "split"
    monkeypatch.setattr(dispatch, "SPLIT_FASTER", frozenset())
    assert dispatch._flash_attn_backend(x, x, x, cu_seqlens=cu) != "split"
    monkeypatch.setattr(dispatch, "SPLIT_FASTER", frozenset({"packed"}))
    assert dispatch._flash_attn_backend(x, x, x, cu_seqlens=cu) == "split"
    gqa = torch.zeros(1, 10, 1, 64)
    assert dispatch._flash_attn_backend(x, gqa, gqa, cu_seqlens=cu) == "split"


# ---------------------------------------------------------------- CUDA (bf16)

gpu = pytest.mark.gpu
# long documents (>= 2048) first, adjacent, last, with length-1 and short ones between them
GPU_LENGTHS = [3000, 1, 17, 5000, 2100, 600, 1, 999, 1, 2048]
GPU_MIN = 2048


def _gpu_case(Hq, Hkv, D, causal, seed, max_len=None):
    from seqpar.kernels.flash_attn.triton import flash_attn_triton

    q, k, v, do = _inputs(sum(GPU_LENGTHS), Hq, Hkv, D, seed, device="cuda")
    cu = _cu(GPU_LENGTHS, "cuda")
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    exact = [t.double() for t in (qb, kb, vb)]  # the reference sees the same rounded inputs
    ref_out, ref_lse = flash_attn_reference(*exact, causal=causal, cu_seqlens=cu, return_lse=True)
    ref_grads = flash_attn_backward_reference(do, *exact, ref_out, ref_lse, causal=causal, cu_seqlens=cu)

    def run(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in (qb, kb, vb)]
        out, lse = fn(*leaves, causal=causal, cu_seqlens=cu, return_lse=True, **kw)
        return (out, lse, *torch.autograd.grad(out, leaves, do.bfloat16()))

    split = run(flash_attn_split, min_len=GPU_MIN, max_len=max_len)
    return split, run(flash_attn_triton), (ref_out, ref_lse, *ref_grads)


@gpu
@pytest.mark.parametrize("Hq, Hkv, D, causal, max_len", [(16, 16, 128, True, None), (16, 16, 128, False, None),
                                                         (16, 4, 128, True, None), (8, 8, 64, True, None),
                                                         (16, 4, 128, True, 2400)])  # 3000 and 5000: heads
def test_gpu_split_bf16_vs_reference_and_triton(Hq, Hkv, D, causal, max_len):
    split, triton_, ref = _gpu_case(Hq, Hkv, D, causal, seed=Hq + D + causal, max_len=max_len)
    for name, s, t, r in zip(("out", "lse", "dq", "dk", "dv"), split, triton_, ref):
        assert s.dtype == t.dtype and s.shape == r.shape, name
        tol = 1e-3 if name == "lse" else 1e-2
        assert _rel(s, r) <= tol, f"{name} vs fp64: {_rel(s, r):.2e}"
        # equal to the Triton path within bf16 noise: no worse than twice the Triton path's own error
        assert _rel(s, t) <= max(2 * _rel(t, r), 1e-4) + 1e-3, f"{name} vs triton: {_rel(s, t):.2e}"


@gpu
@pytest.mark.parametrize("prefix", ["0", "1"])
@pytest.mark.parametrize("Hq, Hkv, max_len", [(16, 16, None), (16, 4, None), (16, 4, 2400)])
def test_gpu_task_split_bf16_vs_reference_and_triton(monkeypatch, Hq, Hkv, max_len, prefix):
    # a disagg server's call: square tasks >= GPU_MIN through cuDNN (one at the buffer's end,
    # padded with zeros), tail pieces and short tasks through Triton, or with SEQPAR_CUDNN_PREFIX=1
    # through cuDNN in chunks (2300 over 7000: two prefix chunks, a causal call after 604 blank rows;
    # 2100 over 9000: three chunks, 756 blank rows; at max_len 2400 both go to Triton, and the
    # 4448 square's tail of 2048 queries after its head of 2400 to cuDNN too); the backward with lse =
    # +inf on the padded queries, into destinations with accumulate
    from seqpar.kernels.flash_attn.split_tasks import PREFIX_ENV, split_backward, split_forward
    from seqpar.kernels.flash_attn.triton import attention_backward, attention_forward

    monkeypatch.setenv(PREFIX_ENV, prefix)
    lq, lk = [3000, 700, 2100, 1, 17, 2500, 2300, 2100, 4448], [3000, 5000, 2100, 1, 0, 2500, 7000, 9000, 4448]
    g = torch.Generator().manual_seed(Hq + Hkv)
    q, do = (torch.randn(1, sum(lq), Hq, 128, generator=g, dtype=F64) for _ in range(2))
    k, v = (torch.randn(1, sum(lk), Hkv, 128, generator=g, dtype=F64) for _ in range(2))
    cu_q, cu_k = _cu(lq, "cuda"), _cu(lk, "cuda")
    qb, kb, vb, dob = (t.cuda().bfloat16() for t in (q, k, v, do))
    exact = [t.double() for t in (qb, kb, vb)]
    kw = dict(causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref_out, ref_lse = flash_attn_reference(*exact, return_lse=True, **kw)
    ref = (ref_out, *flash_attn_backward_reference(dob.double(), *exact, ref_out, ref_lse, **kw))
    out, lse = split_forward(qb, kb, vb, min_len=GPU_MIN, max_len=max_len, **kw)  # 2400: the squares' heads
    zeros = [torch.zeros_like(t) for t in (qb, kb, vb)]
    split = (out, *split_backward(dob, qb, kb, vb, out, lse, min_len=GPU_MIN, max_len=max_len, dq=zeros[0],
                                  dk=zeros[1], dv=zeros[2], accumulate=True, **kw))
    t_out, t_lse, _ = attention_forward(qb, kb, vb, **kw)
    triton_ = (t_out, *attention_backward(dob, qb, kb, vb, t_out, t_lse, **kw))
    for name, s_, t_, r in zip(("out", "dq", "dk", "dv"), split, triton_, ref):
        assert _rel(s_, r) <= 1e-2, f"{name} vs fp64: {_rel(s_, r):.2e}"
        assert _rel(s_, t_) <= max(2 * _rel(t_, r), 1e-4) + 1e-3, f"{name} vs triton: {_rel(s_, t_):.2e}"


@gpu
def test_gpu_dispatch_forced_split_and_rows_without_long_documents(monkeypatch):
    from seqpar import kernels
    from seqpar.kernels import dispatch
    from seqpar.kernels.flash_attn.triton import flash_attn_triton

    q, k, v, do = (t.bfloat16() for t in _inputs(sum(GPU_LENGTHS), 8, 2, 128, seed=1, device="cuda"))
    cu = _cu(GPU_LENGTHS, "cuda")
    monkeypatch.setenv("SEQPAR_ATTN_KERNEL", "split")
    monkeypatch.setenv("SEQPAR_CUDNN_DOC_MIN", str(GPU_MIN))
    assert dispatch.flash_attn_choice(q, k, v, cu_seqlens=cu)[0] == "split"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kernels.flash_attn(*leaves, cu_seqlens=cu)
    grads = torch.autograd.grad(out, leaves, do)
    direct = [t.clone().requires_grad_() for t in (q, k, v)]
    out2 = flash_attn_split(*direct, cu_seqlens=cu, min_len=GPU_MIN)
    assert torch.equal(out, out2)
    for g, h in zip(grads, torch.autograd.grad(out2, direct, do)):
        assert _rel(g, h) <= 1e-3  # cuDNN's backward may sum in another order run to run
    # no long document: the Triton call alone, bit for bit
    monkeypatch.setenv("SEQPAR_CUDNN_DOC_MIN", "100000")
    assert torch.equal(kernels.flash_attn(q, k, v, cu_seqlens=cu), flash_attn_triton(q, k, v, cu_seqlens=cu))


@gpu
def test_gpu_build_plans_run_nothing_on_the_gpu_and_the_plans_serve():
    """build_plans captures its calls in a CUDA graph it throws away: cuDNN builds the plans on the
    host, the GPU runs none of the calls (a write after each stays undone); the plans then compute
    the right attention."""
    from seqpar.kernels.flash_attn import aten, split
    from seqpar.kernels.flash_attn.split import _CAPTURE, build_plans, cudnn_triton_kernels

    split._WARM.clear()  # every thread warms up again: the count below is this test's own
    real, ran = cudnn_triton_kernels(), torch.zeros(2, device="cuda")

    def fwd(*args):
        ran[0] += 1
        return real.dense_fwd(*args)

    def bwd(*args):
        ran[1] += 1
        return real.dense_bwd(*args)

    shapes = [(True, 2304, 2304), (False, 1536, 3072)]  # lengths no other test runs: new plans
    assert build_plans(shapes, 8, 128, device="cuda", kernels=SplitKernels(fwd, bwd, *real[2:])) == shapes
    torch.cuda.synchronize()
    # the warm-up calls (one per thread, 128 x 128) run for real: one forward on this thread, one
    # forward and one backward on the autograd engine's
    assert _CAPTURE["ok"] and ran.tolist() == [2, 1], ran
    for causal, nq, nk in shapes:
        q, k, v = (t.cuda().bfloat16() for t in _inputs(nk, 8, 8, 128, seed=nq)[:3])
        q = q[:, nk - nq:]
        exact = [t.double() for t in (q, k, v)]
        ref = flash_attn_reference(*exact, causal=causal, cu_seqlens_q=_cu([nq], "cuda"),
                                   cu_seqlens_k=_cu([nk], "cuda"))
        out, _ = aten.attention_with_lse(q, k, v, kernel="cudnn", causal=causal)
        assert _rel(out, ref) <= 1e-2


def test_prebuild_covers_every_shape_the_split_then_runs(monkeypatch):
    """`prebuild_plans` calls the dense forward once per length bucket from min_doc_len to
    max_doc_len, then inside a backward pass (torch's cuDNN plans are per thread, a CUDA backward
    has its own) forward and backward, causal, with the calls' heads, head dim and scale; rows of new
    document lengths afterwards run only those shapes (what makes a cuDNN plan: the length, heads,
    head dim, scale, causality; strides are made canonical in aten.py)."""
    from seqpar.kernels.flash_attn.split import max_doc_len, min_doc_len, prebuild_plans

    monkeypatch.setenv("SEQPAR_CUDNN_DOC_MIN", "24")
    monkeypatch.setenv("SEQPAR_CUDNN_SCRATCH_MB", "1")
    monkeypatch.setenv("SEQPAR_CUDNN_BUCKETS", "4")
    Hq, Hkv, D, scale = 4, 2, 8, 8 ** -0.5
    lo, hi = min_doc_len(Hq), max_doc_len(Hq, D, 8)
    assert 24 == lo < 4 * lo < hi, (lo, hi)
    seen = []

    def record(kind):
        def dense(*args):
            q, causal, sc = args[0] if kind == "fwd" else args[1], args[-2], args[-1]
            in_backward = torch._C._current_graph_task_id() != -1
            seen.append((kind, q.shape[1:], causal, sc, in_backward))
            ref = _reference_kernels([])
            return ref.dense_fwd(*args) if kind == "fwd" else ref.dense_bwd(*args)
        return dense

    kernels = SplitKernels(record("fwd"), record("bwd"), *_reference_kernels([])[2:])
    built = prebuild_plans(Hq, D, dtype=F64, device="cpu", kernels=kernels)
    assert built == sorted({bucket_len(n, 4) for n in range(lo, hi + 1)}) and len(built) > 8
    assert seen == ([("fwd", (n, Hq, D), True, scale, False) for n in built]
                    + [(kind, (n, Hq, D), True, scale, True) for n in built for kind in ("fwd", "bwd")])
    prebuilt, seen[:] = {key[:4] for key in seen if key[4]}, []
    rng = torch.Generator().manual_seed(3)
    for _ in range(6):  # rows of fresh lengths, some long (as training packs them)
        lengths = [int(x) for x in torch.randint(1, hi, (3,), generator=rng)] + [lo, hi]
        q, k, v, do = _inputs(sum(lengths), Hq, Hkv, D, seed=len(seen))
        leaves = [t.requires_grad_() for t in (q, k, v)]
        flash_attn_split(*leaves, cu_seqlens=_cu(lengths), kernels=kernels).backward(do)
    assert seen and {key[:4] for key in seen} <= prebuilt, {key[:4] for key in seen} - prebuilt
    monkeypatch.setenv("SEQPAR_CUDNN_BUCKETS", "0")  # exact lengths: one plan per length, nothing to prebuild
    assert prebuild_plans(Hq, D, dtype=F64, device="cpu", kernels=kernels) == []


def test_warm_up_runs_a_piece_over_a_prefix_through_its_merge(monkeypatch):
    """`split_tasks.warm_up` (train.cudnn_prebuild) takes the path whose Triton kernels no other
    call launches before training: a causal piece over a prefix in dense calls merged in fp32, beside
    a task of the Triton call, forward and backward."""
    from seqpar.kernels.flash_attn import split_tasks

    monkeypatch.setenv(split_tasks.PREFIX_ENV, "1")
    merges, calls = [], []
    real_merge = split_tasks.attn_merge_
    monkeypatch.setattr(split_tasks, "attn_merge_", lambda *a: merges.append(a[0].shape) or real_merge(*a))
    split_tasks.warm_up(4, 2, 8, dtype=F64, device="cpu", min_len=9, kernels=_reference_kernels(calls, stateless=True))
    # 9 queries after 9 + 7 prefix keys: a causal call of 7 blank + 9 queries (bucket 16), one block of 9 x 9
    assert [c for c in calls if c[0] == "dense"] == [("dense", 16), ("dense", 9)]
    assert [c[0] for c in calls if c[0] != "dense"] == ["packed"] and merges == [torch.Size([1, 9, 4, 8])]
