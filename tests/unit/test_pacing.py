"""Batch pacing: sizes bounded in time, and the queue's expected wait, from measured batches."""

from __future__ import annotations

import pytest

from processor.server.pacing import SAMPLE_BATCH_MIN, Pacer


def test_without_a_time_budget_batches_are_bounded_by_count_alone() -> None:
    pacer = Pacer(256, 0.0, 8)
    pacer.measured(256, 0.256, 0.001)
    assert pacer.size == 256


def test_a_time_budget_sizes_batches_from_the_measured_cost() -> None:
    pacer = Pacer(256, 0.005, 8)
    for _ in range(50):  # the moving averages settle on 100 us per request, 1 ms per commit
        pacer.measured(100, 0.010, 0.001)
    assert pacer.size == 40  # (5 ms - 1 ms) / 100 us
    for _ in range(50):  # a slower machine: fewer per batch
        pacer.measured(100, 0.020, 0.001)
    assert pacer.size == 20


@pytest.mark.parametrize(("apply_seconds", "size"), [(0.0001, 256), (10.0, 8)])
def test_the_size_stays_within_its_bounds(apply_seconds: float, size: int) -> None:
    pacer = Pacer(256, 0.005, 8)
    for _ in range(50):
        pacer.measured(100, apply_seconds, 0.001)
    assert pacer.size == size


def test_a_commit_slower_than_the_budget_still_gets_as_much_work_per_batch() -> None:
    pacer = Pacer(256, 0.005, 8)
    for _ in range(50):  # 100 us per request, a 10 ms fsync (a slow disk)
        pacer.measured(100, 0.010, 0.010)
    assert pacer.size == 100  # 10 ms of work per 10 ms commit, not 8 requests per fsync


def test_small_batches_do_not_set_the_time_per_request() -> None:
    # One request's batch is nearly all fixed cost; counted per request it would shrink the
    # batches, whose shorter time would shrink them again.
    pacer = Pacer(256, 0.005, 8)
    pacer.measured(SAMPLE_BATCH_MIN - 1, 1.0, 0.001)
    assert pacer.size == 256 and pacer.queue_seconds(10) == pytest.approx(0.0002)


def test_the_queue_wait_counts_a_commit_per_batch() -> None:
    pacer = Pacer(4, 0.0, 1)
    pacer._apply_per_request, pacer._commit = 0.001, 0.010
    assert pacer.queue_seconds(0) == 0
    assert pacer.queue_seconds(4) == pytest.approx(0.004 + 0.010)
    assert pacer.queue_seconds(5) == pytest.approx(0.005 + 0.020)


def test_a_shorter_time_gives_a_smaller_batch_never_a_larger_one() -> None:
    pacer = Pacer(256, 0.005, 8)
    for _ in range(50):  # 100 us per request, 1 ms per commit: 40 fill the 5 ms budget
        pacer.measured(100, 0.010, 0.001)
    assert pacer.size_within(0.002) == 10  # (2 ms - 1 ms) / 100 us
    assert pacer.size_within(0.0011) == 10  # work still gets at least the commit's time
    assert pacer.size_within(0.0001) == 10
    assert pacer.size_within(0.010) == 40  # longer than the budget: the budget's size
    # Without a time budget the operator asked for batches bounded by count alone.
    unbounded = Pacer(256, 0.0, 8)
    unbounded.measured(100, 0.010, 0.001)
    assert unbounded.size_within(0.001) == 256
