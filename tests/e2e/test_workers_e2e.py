"""server.workers > 1: several processes serve links on the one ledger, as one daemon."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import RunningDaemon, authorization, decode, echo_test, run_cli

pytestmark = pytest.mark.e2e

WORKERS = 2
LINKS = 12
LINKS_MAX = 64


def worker_pids(primary: int) -> list[int]:
    children = Path(f"/proc/{primary}/task/{primary}/children").read_text().split()
    return [int(pid) for pid in children]


def open_link_sockets(pid: int) -> int:
    """TCP sockets a process holds besides its listener and its channel to the primary."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


def metric(daemon: RunningDaemon, pattern: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+]+)$", text, re.M))


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[RunningDaemon]:
    config = tmp_path / "workers.toml"
    config.write_text(f"[server]\nworkers = {WORKERS}\n")
    running = RunningDaemon(tmp_path / "ledger", config).start()
    try:
        yield running
    finally:
        running.stop()


def test_links_are_served_by_every_process_on_one_ledger(pool: RunningDaemon) -> None:
    assert pool.process is not None
    assert f"{WORKERS} worker processes" in "".join(pool.stdout)
    [worker] = worker_pids(pool.process.pid)
    idle_sockets = open_link_sockets(worker)
    links = []
    # The kernel spreads links over the processes' sockets by address: keep opening (bounded)
    # until the worker holds some (an answered echo: the link was accepted by then), so the
    # cross-process retransmissions below mean something.
    while len(links) < LINKS or (
        open_link_sockets(worker) <= idle_sockets and len(links) < LINKS_MAX
    ):
        links.append(pool.connect())
        assert links[-1].exchange(echo_test())["39"] == "00"
    count = len(links)
    try:
        assert open_link_sockets(worker) > idle_sockets  # the worker holds some of the links
        requests = [authorization(amount=100 + index) for index in range(count)]
        answers = [link.exchange(request) for link, request in zip(links, requests, strict=True)]
        assert [answer["39"] for answer in answers] == ["00"] * count
        # Approval codes come from one sequence in the one ledger: never the same twice.
        assert len({answer["38"] for answer in answers}) == count
        # A retransmission on every other link, whichever process serves it, gets the same
        # bytes: the answers live in the shared ledger, not in a process.
        for index, request in enumerate(requests):
            other = links[(index + 1) % count]
            other.send_fields(request)
            assert decode(other.receive()) == answers[index]
        # /metrics sums every process: each worker reports within a second.
        deadline = time.monotonic() + 10
        approved = 0.0
        while time.monotonic() < deadline:
            approved = metric(
                pool, r'processor_requests_total\{mti="0100",reason="approved",response_code="00"\}'
            )
            if approved == count:
                break
            time.sleep(0.2)
        assert approved == count
        # /healthz counts the links of every process, not the primary's alone.
        links_seen = 0
        while time.monotonic() < deadline:
            url = f"http://127.0.0.1:{pool.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=10) as response:
                links_seen = json.loads(response.read())["links"]
            if links_seen == count:
                break
            time.sleep(0.2)
        assert links_seen == count
        # Every process writes to the one stderr: each line says which process wrote it.
        lines = [json.loads(line) for line in pool.stderr().splitlines() if line.startswith("{")]
        serving = [line for line in lines if line["message"] == "worker 1: serving links"]
        assert [(line["process"], line["pid"]) for line in serving] == [("worker-1", worker)]
        assert {line["process"] for line in lines} >= {"primary", "worker-1"}
    finally:
        for link in links:
            link.close()


def test_a_killed_worker_is_restarted_and_the_daemon_keeps_answering(
    pool: RunningDaemon,
) -> None:
    assert pool.process is not None
    [worker] = worker_pids(pool.process.pid)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 20
    restarted: list[int] = []
    while time.monotonic() < deadline:
        restarted = [pid for pid in worker_pids(pool.process.pid) if pid != worker]
        if restarted and "worker 1 exited" in pool.stderr():
            break
        time.sleep(0.1)
    assert restarted, pool.stderr()
    time.sleep(1.0)  # let it reach ready
    links = [pool.connect() for _ in range(LINKS)]
    try:
        for link in links:
            assert link.exchange(echo_test())["39"] == "00"
            assert link.exchange(authorization())["39"] == "00"
    finally:
        for link in links:
            link.close()


def test_stopping_the_primary_stops_every_worker(pool: RunningDaemon) -> None:
    assert pool.process is not None
    workers = worker_pids(pool.process.pid)
    link = pool.connect()
    assert link.exchange(authorization())["39"] == "00"
    link.close()
    assert pool.terminate() == 0
    for pid in workers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
    assert "processor: stopped" in "".join(pool.stdout)


def test_a_bad_worker_count_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nworkers = 0\n")
    result = run_cli("serve", "--config", str(config), "--ledger", str(tmp_path / "ledger"))
    assert result.returncode == 2
    assert "$.server.workers" in result.stderr


@pytest.mark.parametrize(
    ("first", "second"), [("127.0.0.1", "localhost"), ("", "0.0.0.0"), ("0.0.0.0", "127.0.0.1")]
)
def test_two_listeners_on_one_address_are_refused_with_workers_too(
    tmp_path: Path, first: str, second: str
) -> None:
    """The config compares host names: "localhost" and "127.0.0.1" (or "" and "0.0.0.0", or
    every address and one of them) on one port passed it, SO_REUSEPORT (workers > 1) let both
    bind, and the kernel handed each network's links to one dialect or the other. The start
    now fails naming both listeners, as it does without workers."""
    import socket

    with socket.socket() as probe:  # a port free now (no listener is on it)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "twice.toml"
    config.write_text(
        f"[server]\nworkers = {WORKERS}\n"
        f"[[listeners]]\nname = 'a'\nhost = '{first}'\nport = {port}\n"
        f"[[listeners]]\nname = 'b'\nhost = '{second}'\nport = {port}\n"
        "framing = 'ascii4'\nbitmap = 'binary'\n"
    )
    result = run_cli(
        "serve",
        "--demo",
        "--config",
        str(config),
        "--ledger",
        str(tmp_path / "ledger"),
        "--http-port",
        "0",
    )
    assert result.returncode == 2, result.stderr
    assert f"listeners 'a' and 'b' both listen on port {port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_worker_serves_every_listener_in_its_own_dialect(tmp_path: Path) -> None:
    from harness import Link

    config = tmp_path / "workers.toml"
    config.write_text(
        f"[server]\nworkers = {WORKERS}\n"
        "[[listeners]]\nname = 'network'\nport = 0\n"
        "[[listeners]]\nname = 'binary-net'\nport = 0\nbitmap = 'binary'\nframing = 'ascii4'\n"
    )
    running = RunningDaemon(tmp_path / "ledger", config).start()
    try:
        assert running.process is not None
        [worker] = worker_pids(running.process.pid)
        idle_sockets = open_link_sockets(worker)
        links = []
        # Open links to both listeners (bounded) until the worker holds some: then both
        # processes answer, each on both ports, in each port's dialect.
        while len(links) < 2 * LINKS or (
            open_link_sockets(worker) <= idle_sockets + 2 and len(links) < LINKS_MAX
        ):
            if len(links) % 2:
                link = Link(running.ports["binary-net"], prefix="ascii4", bitmap="binary")
            else:
                link = Link(running.ports["network"])
            links.append(link)
            assert link.exchange(echo_test())["39"] == "00"
        assert open_link_sockets(worker) > idle_sockets + 2
        answers = [link.exchange(authorization(amount=100 + i)) for i, link in enumerate(links)]
        assert [answer["39"] for answer in answers] == ["00"] * len(links)
        for link in links:
            link.close()
    finally:
        running.stop()


def serving_pids(daemon: RunningDaemon, index: int) -> list[int]:
    """The pids of worker `index`'s starts, in order, from its "serving links" log lines."""
    lines = [json.loads(line) for line in daemon.stderr().splitlines() if line.startswith("{")]
    return [line["pid"] for line in lines if line["message"] == f"worker {index}: serving links"]


def wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_a_crashing_worker_spends_its_own_restart_budget_not_the_others(tmp_path: Path) -> None:
    """The budget was the pool's: one worker crashing over and over spent it, and another
    worker's single crash then left that one down for up to a minute."""
    from processor import limits

    config = tmp_path / "workers.toml"
    config.write_text("[server]\nworkers = 3\n")
    pool = RunningDaemon(tmp_path / "ledger", config).start()
    try:
        assert wait_for(lambda: bool(serving_pids(pool, 1) and serving_pids(pool, 2)), 20)
        for crash in range(limits.worker_restarts_per_minute_max + 1):
            os.kill(serving_pids(pool, 1)[-1], signal.SIGKILL)
            if crash < limits.worker_restarts_per_minute_max:
                starts = crash + 2
                assert wait_for(lambda: len(serving_pids(pool, 1)) == starts, 20), crash  # noqa: B023
        assert wait_for(lambda: "leaving it down" in pool.stderr(), 10), pool.stderr()[-2000:]
        os.kill(serving_pids(pool, 2)[-1], signal.SIGKILL)
        # Worker 2 has crashed once: started again at once, while worker 1 rests.
        assert wait_for(lambda: len(serving_pids(pool, 2)) == 2, 20), pool.stderr()[-2000:]
        assert pool.stderr().count("leaving it down") == 1
    finally:
        pool.stop()


def test_a_sighup_to_every_process_is_the_orderly_stop(pool: RunningDaemon) -> None:
    """A closed terminal sends SIGHUP to the whole process group: it killed the primary and
    its workers at once, answers in flight and the checkpoint lost."""
    assert pool.process is not None
    workers = worker_pids(pool.process.pid)
    link = pool.connect()
    assert link.exchange(authorization(amount=100))["39"] == "00"
    for pid in workers:  # as the terminal's hang-up reaches each of them
        os.kill(pid, signal.SIGHUP)
    assert pool.terminate(signum=signal.SIGHUP) == 0
    link.close()
    assert "processor: stopped" in "".join(pool.stdout)
    assert "Traceback" not in pool.stderr()
