"""The doc_balanced planner: which documents are cut, which rank holds each of the others, and
where every token lives (the ring attention op itself is checked in test_ring.py)."""
import itertools

import pytest
import torch

from seqpar.bench.ring import lognormal_lengths
from seqpar.parallel import doc_balance
from seqpar.parallel.doc_balance import cut_cost, doc_balanced_plan, place_documents, whole_cost


def _cu(lengths):
    return list(itertools.accumulate([0] + lengths))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_rank_holds_the_same_rows_and_every_token_once(world):
    lengths = lognormal_lengths(65536)
    plan = doc_balanced_plan(_cu(lengths), world)
    assert plan.source.shape == (world, plan.local_len)
    real = plan.source[plan.source >= 0]
    assert torch.equal(real.sort().values, torch.arange(65536))  # each token exactly once
    assert torch.equal(plan.source.reshape(-1)[plan.gathered], torch.arange(65536))
    # padding: < 2N per cut document, plus the pad documents the placement allows
    pad = plan.local_len * world - 65536
    assert pad <= doc_balance.MAX_PAD_FRACTION * 65536 + 2 * world * len(plan.placement.split)
    # a whole document's tokens sit together, in order, on its rank after the cut documents' rows
    starts = _cu(lengths)
    for d, r in enumerate(plan.placement.owner):
        if r >= 0:
            rows = plan.source[r].tolist()
            at = rows.index(starts[d])
            assert at >= plan.split_len and rows[at:at + lengths[d]] == list(range(starts[d], starts[d + 1]))
    # the cut documents' rows are doc_zigzag's storage of those documents alone
    if plan.split is not None:
        assert plan.split_len == plan.split.local_len


@pytest.mark.parametrize("total", [65536, 131072])
def test_two_ranks_on_the_bench_mix_are_balanced_with_few_documents_cut(total):
    lengths = lognormal_lengths(total)  # the bench's packed case (24 and 49 documents)
    placed = place_documents(lengths, 2)
    ideal = sum(whole_cost(n) for n in lengths) / 2
    assert max(placed.cost) <= 1.05 * ideal, (placed.cost, ideal)  # doc_zigzag models ~1.33-1.39 here
    assert max(placed.work) / (sum(placed.work) / 2) <= 1.02, placed.work  # query-key pairs
    assert len(placed.split) <= 1, placed.split


@pytest.mark.parametrize("world", [4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_slowest_rank_never_models_slower_than_doc_zigzag(world, seed):
    lengths = lognormal_lengths(131072, seed)
    placed = place_documents(lengths, world)
    assert max(placed.cost) <= sum(cut_cost(n, world) for n in lengths) + 1e-9
    # a document longer than a rank's share of the row is never kept whole
    share = sum(lengths) / world
    assert all(placed.owner[d] == -1 for d, n in enumerate(lengths) if n > share * 1.03)


def test_placement_is_deterministic_and_cached_per_bounds():
    lengths = lognormal_lengths(131072, 1)
    first = place_documents(lengths, 4)
    assert place_documents(list(lengths), 4) == first
    doc_balance._balanced.cache_clear()
    plan = doc_balanced_plan(torch.tensor(_cu(lengths), dtype=torch.int32), 4)
    assert doc_balanced_plan(_cu(lengths), 4) is plan and plan.placement == first


def test_small_documents_stay_whole_and_nothing_is_cut_when_they_balance():
    placed = place_documents([250] * 8, 4)
    assert placed.split == () and placed.local_len == 500 and sorted(placed.owner) == [0, 0, 1, 1, 2, 2, 3, 3]
    one_long = place_documents([300, 1, 2], 4)  # longer than the row share: cut; the others whole
    assert one_long.split == (0,) and one_long.owner[1:] != (-1, -1)
    with pytest.raises(ValueError, match="documents of >= 1 token"):
        place_documents([3, 0], 2)
