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


def _replay_interleaved(pp, virtual, n_micro):
    """Run every rank's `interleaved_rounds` against each other with labelled messages: a round
    posts its sends and receives (in the executor's order) and ends when all of them have met
    their partner, first come first matched per ordered rank pair (NCCL's and gloo's rule).
    Returns the (micro-batch, stage) pairs run forward and backward; fails on a deadlock or on a
    message that reaches the wrong chunk."""
    from collections import deque

    from seqpar.parallel.pipeline import interleaved_chunk, interleaved_micro, interleaved_rounds

    last_stage = pp * virtual - 1
    rounds = [interleaved_rounds(pp, virtual, n_micro, r) for r in range(pp)]
    pos, posted = [0] * pp, [None] * pp
    inputs = [[deque() for _ in range(virtual)] for _ in range(pp)]
    grads = [[deque() for _ in range(virtual)] for _ in range(pp)]
    alive = [[deque() for _ in range(virtual)] for _ in range(pp)]
    sends, recvs = {}, {}  # (src, dst) -> deque of [payload, matched] / [slot, matched]
    done_f, done_b = [], []
    while any(pos[r] < len(rounds[r]) for r in range(pp)):
        progress = False
        for r in range(pp):
            if pos[r] == len(rounds[r]) or posted[r] is not None:
                continue
            fk, bk, send_next, send_prev, recv_prev, recv_next = rounds[r][pos[r]]
            y = dx = None
            if fk is not None:
                c, mb = interleaved_chunk(fk, pp, virtual), interleaved_micro(fk, pp, virtual)
                stage = c * pp + r
                x = None if stage == 0 else inputs[r][c].popleft()
                assert x == (None if stage == 0 else ("act", mb, stage - 1)), (r, fk, x)
                alive[r][c].append(mb)
                y = ("act", mb, stage)
                done_f.append((mb, stage))
            if bk is not None:
                c, mb = interleaved_chunk(bk, pp, virtual, False), interleaved_micro(bk, pp, virtual)
                stage = c * pp + r
                assert alive[r][c].popleft() == mb
                dy = None if stage == last_stage else grads[r][c].popleft()
                assert dy == (None if stage == last_stage else ("grad", mb, stage + 1)), (r, bk, dy)
                dx = ("grad", mb, stage)
                done_b.append((mb, stage))
            ops = []
            nxt, prv = (r + 1) % pp, (r - 1) % pp
            if send_next:
                ops.append(("send", nxt, [y, False]))
            if recv_prev is not None:
                ops.append(("recv", prv, [("x", recv_prev), False]))
            if send_prev:
                ops.append(("send", prv, [dx, False]))
            if recv_next is not None:
                ops.append(("recv", nxt, [("dy", recv_next), False]))
            for kind, peer, op in ops:
                (sends if kind == "send" else recvs).setdefault((r, peer) if kind == "send" else (peer, r), deque()).append(op)
            posted[r] = ops
            progress = True
        for pair in set(sends) & set(recvs):
            while sends[pair] and recvs[pair]:
                s, slot = sends[pair].popleft(), recvs[pair].popleft()
                s[1] = slot[1] = True
                slot.append(s[0])
        for r in range(pp):
            if posted[r] is not None and all(op[1] for _, _, op in posted[r]):
                for kind, _, op in posted[r]:
                    if kind == "recv":
                        (target, c), _, payload = op
                        assert payload is not None and payload[0] == ("act" if target == "x" else "grad"), payload
                        (inputs if target == "x" else grads)[r][c].append(payload)
                posted[r] = None
                pos[r] += 1
                progress = True
        assert progress, f"deadlock: rounds {pos} of {[len(x) for x in rounds]}"
    assert not any(q for rank in inputs + grads + alive for q in rank)
    return done_f, done_b


@pytest.mark.parametrize("pp,virtual,n_micro", [(2, 2, 2), (2, 2, 4), (2, 3, 6), (3, 2, 6), (4, 2, 4), (4, 3, 8)])
def test_interleaved_schedule_pairs_every_message(pp, virtual, n_micro):
    done_f, done_b = _replay_interleaved(pp, virtual, n_micro)
    every = {(mb, s) for mb in range(n_micro) for s in range(pp * virtual)}
    assert sorted(done_f) == sorted(every) and sorted(done_b) == sorted(every)


def test_interleaved_needs_a_multiple_of_pp_micro_batches():
    from seqpar.parallel.pipeline import interleaved_rounds

    with pytest.raises(ValueError, match="3 micro-batches are not a multiple of pp=2"):
        interleaved_rounds(2, 2, 3, 0)


def test_virtual_stages_interleave_over_ranks():
    from types import SimpleNamespace

    from seqpar.parallel.pipeline import virtual_stage_layers

    par = SimpleNamespace(pp=2, virtual_stages=2, pp_layers=[1, 2, 2, 3])
    assert virtual_stage_layers(None, par, 64) == [[[0], [3, 4]], [[1, 2], [5, 6, 7]]]
