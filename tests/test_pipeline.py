"""Stage balancing of the pipeline (the schedule itself is checked end to end in test_training)."""
import pytest

from seqpar.parallel.pipeline import split_layers


def test_split_minimises_the_largest_stage():
    assert split_layers([1, 1, 1, 1], 2) == [[0, 1], [2, 3]]
    # one heavy (softmax) layer among light (linear) ones gets a stage nearly to itself
    assert split_layers([1, 1, 1, 6, 1, 1], 2) == [[0, 1, 2], [3, 4, 5]]
    assert split_layers([1, 1, 1, 6, 1, 1], 3) == [[0, 1, 2], [3], [4, 5]]


def test_last_stage_carries_the_output_head():
    assert split_layers([1, 1, 1, 1], 2, last_extra=2) == [[0, 1, 2], [3]]


def test_every_layer_in_exactly_one_stage():
    costs = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    for pp in range(1, len(costs) + 1):
        stages = split_layers(costs, pp)
        assert len(stages) == pp and all(stages)
        assert [i for s in stages for i in s] == list(range(len(costs)))


def test_more_stages_than_layers_is_an_error():
    with pytest.raises(ValueError, match="cannot cut 2 layers into 3"):
        split_layers([1, 1], 3)
