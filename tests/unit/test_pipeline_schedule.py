"""The (interleaved) 1F1B order as a pure function: units, dependencies, channels, bubble.

The pipeline's rules, written here independently of the runner: model chunk
g = c P + s is local chunk c of pipeline rank s; a forward receives its input
from model chunk g - 1 (tokens for g = 0) and a backward its gradient from
model chunk g + 1 (the loss for the last); messages travel over one in-order
channel per ordered pair of ranks, and a rank blocks on a receive, never on a
send.
"""

import pytest

from trainer.parallel.pipeline import schedule, theoretical_bubble, warmup_count

CASES = [
    (P, v, M)
    for P in (2, 3, 4, 8)
    for v in (1, 2, 3, 4)
    for M in ((P, 2 * P, 3 * P, 5 * P) if v > 1 else (1, 2, 3, 5, 8, 16))
]


def _legacy_1f1b(stage, stages, M):
    """The plain 1F1B order the trainer ran before interleaving existed."""
    warmup = min(stages - stage - 1, M)
    order = [("F", i, 0) for i in range(warmup)]
    for i in range(M - warmup):
        order += [("F", warmup + i, 0), ("B", i, 0)]
    return order + [("B", i, 0) for i in range(M - warmup, M)]


def _messages(P, v, s, op):
    """(message received before ``op`` runs, message sent after it): (peer, what)."""
    kind, mb, c = op
    g, last = c * P + s, P * v - 1
    if kind == "F":
        recv = None if g == 0 else ((s - 1) % P, ("act", mb, g))
        send = None if g == last else ((s + 1) % P, ("act", mb, g + 1))
    else:
        recv = None if g == last else ((s + 1) % P, ("grad", mb, g))
        send = None if g == 0 else ((s - 1) % P, ("grad", mb, g - 1))
    return recv, send


def _simulate(P, v, M, forward=1.0, backward=2.0):
    """Run every rank's order on a shared clock (units of one stage's forward).

    Returns the makespan, or raises if the ranks deadlock or a receive would get
    another message than the one it waits for."""
    orders = [schedule(s, P, v, M) for s in range(P)]
    channels = {}  # (src, dst) -> [(message, time sent)], in send order
    read = {}  # (src, dst) -> messages consumed
    pos, clock = [0] * P, [0.0] * P
    progress = True
    while progress:
        progress = False
        for s in range(P):
            while pos[s] < len(orders[s]):
                op = orders[s][pos[s]]
                recv, send = _messages(P, v, s, op)
                start = clock[s]
                if recv is not None:
                    src, want = recv
                    queue, k = channels.get((src, s), []), read.get((src, s), 0)
                    if k >= len(queue):
                        break  # blocked: not sent yet
                    got, sent_at = queue[k]
                    assert got == want, f"rank {s} waits for {want} but the channel has {got}"
                    read[(src, s)] = k + 1
                    start = max(start, sent_at)
                clock[s] = start + (forward if op[0] == "F" else backward) / v
                if send is not None:
                    channels.setdefault((s, send[0]), []).append((send[1], clock[s]))
                pos[s] += 1
                progress = True
    stuck = [s for s in range(P) if pos[s] < len(orders[s])]
    assert not stuck, f"P={P} v={v} M={M}: ranks {stuck} deadlock"
    assert all(read.get(k, 0) == len(q) for k, q in channels.items())  # nothing left unread
    return max(clock)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("P,v,M", CASES)
def test_every_unit_runs_once_forward_before_backward(P, v, M):
    for s in range(P):
        order = schedule(s, P, v, M)
        units = {(i, c) for i in range(M) for c in range(v)}
        fwd = [(i, c) for k, i, c in order if k == "F"]
        bwd = [(i, c) for k, i, c in order if k == "B"]
        assert sorted(fwd) == sorted(bwd) == sorted(units)
        for i, c in units:
            assert order.index(("F", i, c)) < order.index(("B", i, c))
        assert order[-1] == ("B", M - 1, 0)  # where the DP sync gets armed


@pytest.mark.timeout(30)
@pytest.mark.parametrize("P,v,M", CASES)
def test_warm_up_is_the_closed_form_then_one_forward_one_backward(P, v, M):
    for s in range(P):
        order = schedule(s, P, v, M)
        expected = min(P - s - 1, M) if v == 1 else min(2 * (P - s - 1) + (v - 1) * P, v * M)
        assert warmup_count(s, P, v, M) == expected
        kinds = "".join(k for k, _, _ in order)
        steady = v * M - expected
        assert kinds == "F" * expected + "FB" * steady + "B" * expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("P,v,M", CASES)
def test_forwards_go_through_the_chunks_in_groups_of_P_and_backwards_in_reverse(P, v, M):
    order = schedule(0, P, v, M)
    fwd = [(i, c) for k, i, c in order if k == "F"]
    bwd = [(i, c) for k, i, c in order if k == "B"]
    group = [(g * P + j, c) for g in range(M // P) for c in range(v) for j in range(P)]
    if v > 1:
        assert fwd == group
        assert bwd == [(i, v - 1 - c) for i, c in group]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("P,v,M", CASES)
def test_ranks_never_deadlock_and_receive_in_the_order_sent(P, v, M):
    _simulate(P, v, M)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("P,v,M", CASES)
def test_equal_unit_times_give_the_closed_form_bubble(P, v, M):
    # Not a timing test: a simulated clock in which a forward of the whole stage takes 1
    # and a backward 2. Fill and drain then cost exactly (P - 1) chunk times.
    makespan = _simulate(P, v, M)
    bubble = 1 - M * 3.0 / makespan
    assert bubble == pytest.approx(theoretical_bubble(P, M, v), abs=1e-9)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("M", [1, 2, 3, 8])
def test_one_virtual_stage_is_plain_1f1b_unchanged(P, M):
    for s in range(P):
        assert schedule(s, P, 1, M) == _legacy_1f1b(s, P, M)


def test_interleaving_more_chunks_shrinks_the_bubble():
    assert theoretical_bubble(4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble(4, 8, 2) == pytest.approx(3 / 19)


def test_micro_batches_not_in_whole_rounds_of_P_are_refused():
    with pytest.raises(ValueError, match=r"micro-batches \(6\) to be a multiple .* stages \(4\)"):
        schedule(0, 4, 2, 6)
