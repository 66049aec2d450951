"""A child process past its restart budget rests and is started again (processor/channel.py).

It was left down for good: a worker's listening sockets stayed open in the primary, and the
kernel went on handing it a share of new links that nobody accepted (14 of 40 hung, in the
review's run). The child here is a real interpreter that exits at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest

from processor import limits
from processor.channel import Child
from processor.config import Config
from processor.metrics import Metrics


def test_a_child_past_its_budget_rests_then_starts_again_and_stops_when_asked() -> None:
    async def run() -> list[object]:
        calls: list[object] = []
        # The budget spent 59.7 s ago: one more start is allowed 0.3 s from now.
        spent = time.monotonic() - 59.7
        restarts = deque([spent] * limits.worker_restarts_per_minute_max)
        child = Child(
            "test child",
            "test-child",
            1,
            ["processor.no_such_module"],  # python -m exits 1 at once
            Config(),
            Metrics(),
            restarts,
            lambda: ([], lambda: None),
            rest=calls.append,
        )
        await child.spawn()
        supervisor = asyncio.create_task(child.supervise())
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert child.process is not None
        calls.append(("budget spent before", sum(1 for at in restarts if at <= spent)))
        await child.stop()
        await asyncio.wait_for(supervisor, 5)
        return calls

    calls = asyncio.run(run())
    assert calls[:2] == [True, False], calls  # left down (sockets closed), then back up
    assert calls[2] == ("budget spent before", 0), calls  # the old starts left the window


def test_a_child_that_stops_reporting_is_killed_and_started_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a child's exit was watched: a hung worker (a deadlock, SIGSTOP) kept its share of
    new links unanswered while every probe said healthy. Silent past the bound once ready,
    it is killed, and supervision starts another."""
    monkeypatch.setattr(limits, "child_report_silence_seconds_max", 0.5)
    # The child imports tests.unit.silent_child from the repository, wherever pytest runs.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))

    metrics = Metrics()
    up = metrics.child_process_up.labels("test-child")
    seen_up: list[float] = []

    async def run() -> tuple[int, int]:
        child = Child(
            "test child",
            "test-child",
            1,
            ["tests.unit.silent_child"],  # reports ready, then hangs
            Config(),
            metrics,
            deque(),
            lambda: ([], lambda: None),
        )
        await child.spawn()
        seen_up.append(up._value.get())  # started, not ready yet: not up
        assert await child.ready(10) is None
        seen_up.append(up._value.get())
        assert child.process is not None
        first = child.process.pid
        supervisor = asyncio.create_task(child.supervise())
        deadline = time.monotonic() + 10
        while child.process.pid == first and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        second = child.process.pid
        await child.stop()
        await asyncio.wait_for(supervisor, 5)
        return first, second

    with caplog.at_level("ERROR", logger="processor.children"):
        first, second = asyncio.run(run())
    assert second != first  # killed, and another started
    assert seen_up == [0.0, 1.0]
    assert metrics.child_process_exits.labels("test-child")._value.get() == 1
    assert any("sent no report for" in r.getMessage() for r in caplog.records)


def test_a_report_half_read_when_a_stop_comes_is_read_whole(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The silence bound cut a read off between a report's length and its body: asked to
    stop meanwhile, the next read took the body for a length and killed the draining child."""
    from processor.channel import _LENGTH, Report, _encode_report

    monkeypatch.setattr(limits, "child_report_silence_seconds_max", 0.3)
    metrics = Metrics()
    child = Child(
        "test child", "test-child", 1, [], Config(), metrics, deque(), lambda: ([], lambda: None)
    )
    sample = ("processor_open_links", "processor_open_links", (("listener", "x"),), 3.0)
    body = _encode_report(Report("metrics", [sample]))

    async def run() -> None:
        reader = asyncio.StreamReader()
        child._ready.set()
        reading = asyncio.create_task(child._read_reports(reader))
        reader.feed_data(_LENGTH.pack(len(body)))  # the length, then the child is busy
        await asyncio.sleep(0.1)
        child.stopping = True  # a stop, while the silence bound runs out
        await asyncio.sleep(0.4)
        reader.feed_data(body)
        reader.feed_eof()
        await asyncio.wait_for(reading, 5)

    with caplog.at_level("ERROR", logger="processor.children"):
        asyncio.run(run())
    assert not [r.getMessage() for r in caplog.records]
    assert metrics.workers.gauge("processor_open_links") == 3.0


def test_a_failed_start_is_tried_again_without_counting_another_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a start failed (EMFILE, say), the loop waited on the old process, exited long
    ago: each retry counted and logged one more exit."""
    monkeypatch.setattr(limits, "child_report_silence_seconds_max", 60.0)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    metrics = Metrics()
    starts = [0]

    def prepare() -> tuple[list[int], Callable[[], None]]:
        starts[0] += 1
        if starts[0] in (2, 3):  # the first two restarts fail
            raise OSError(24, "Too many open files")
        return [], lambda: None

    async def run() -> None:
        child = Child(
            "test child",
            "test-child",
            1,
            ["tests.unit.silent_child"],
            Config(),
            metrics,
            deque(),
            prepare,
        )
        await child.spawn()
        assert await child.ready(10) is None
        assert child.process is not None
        supervisor = asyncio.create_task(child.supervise())
        child.process.kill()  # the one exit
        deadline = time.monotonic() + 15
        while starts[0] < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert starts[0] == 4 and await child.ready(10) is None
        await child.stop()
        await asyncio.wait_for(supervisor, 5)

    asyncio.run(run())
    assert metrics.child_process_exits.labels("test-child")._value.get() == 1


def test_a_resting_child_stops_at_once_when_asked() -> None:
    async def run() -> None:
        restarts = deque([time.monotonic()] * limits.worker_restarts_per_minute_max)
        rests: list[bool] = []
        child = Child(
            "test child",
            "test-child",
            1,
            ["processor.no_such_module"],
            Config(),
            Metrics(),
            restarts,
            lambda: ([], lambda: None),
            rest=rests.append,
        )
        await child.spawn()
        supervisor = asyncio.create_task(child.supervise())
        while not rests:
            await asyncio.sleep(0.05)
        await child.stop()
        await asyncio.wait_for(supervisor, 5)  # woken: not after the minute's rest
        assert rests == [True]

    asyncio.run(run())


def test_a_workers_socket_joins_the_primarys_on_a_dual_stack_listener() -> None:
    """With host = "" the pool bound its workers to the address read back from the primary's
    socket, "::": IPv6 only, which the kernel never groups with the primary's dual-stack
    socket, so every link went to the primary."""
    import socket

    from processor.config import parse_config
    from processor.server.daemon import listen
    from processor.server.workers import WorkerPool

    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack sockets here: the case cannot arise")
    config = parse_config(
        "[server]\nworkers = 2\n[[listeners]]\nname = 'network'\nhost = ''\nport = 0\n"
    )
    primary = listen("", 0, shared=True)
    try:
        pool = WorkerPool(config, [primary], Metrics())
        [[worker]] = pool._sockets
        try:
            assert worker.getsockname()[1] == primary.getsockname()[1]
            v6only = (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
            assert worker.getsockopt(*v6only) == primary.getsockopt(*v6only) == 0
        finally:
            worker.close()
    finally:
        primary.close()
