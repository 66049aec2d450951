"""The ledger's room and its copies: a map that grows to its ceiling, then answers 96
ledger_full; backups taken while the daemon serves, restored, verified and replayed.

A real daemon on a 1 MiB map with a 2 MiB ceiling (durability process, to be quick) is sent
distinct authorisations until one is answered 96. Then: the map grew once, /readyz is 503 with
the reason, echo tests and the API's reads still answer, the 96 lines are rate-limited, and
after a restart with a higher ceiling the same request (a retransmission of an identity that
was answered 96) is decided afresh, because a 96 is never stored.

A backup (`processor ledger backup`) taken while a link keeps authorising is copied into a new
directory, passes `processor ledger verify`, and a daemon serving it answers every request that
was answered before the backup began byte for byte again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness import PAN_KEY, RunningDaemon, authorization, echo_test, run_cli, sample, scrape

TOKEN = "e2e-ledger-room-api-token"
REQUESTS_MAX = 20_000  # far more than 2 MiB holds: the loop must end at a 96 before this
START = 1 << 20
CEILING = 2 << 20
LOAD_REQUESTS_MAX = 20_000  # the backup test's load: bounded in count and in time
LOAD_SECONDS_MAX = 60.0


def config(path: Path, ceiling: int) -> Path:
    path.write_text(
        f'[ledger]\ndurability = "process"\nmap_size_bytes = {START}\n'
        f"map_size_max_bytes = {ceiling}\n"
    )
    return path


def get(daemon: RunningDaemon, path: str) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.http_port}{path}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_full_ledger_answers_96_stays_readable_and_decides_afresh_with_room(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    settings = config(tmp_path / "processor.toml", CEILING)
    daemon = RunningDaemon(tmp_path / "ledger", settings, env).start()
    refused: dict[str, str] | None = None
    try:
        link = daemon.connect()
        answered = 0
        for _ in range(REQUESTS_MAX):
            request = authorization(amount=1)
            answer = link.exchange(request)
            if answer["39"] == "96":
                refused = request
                break
            answered += 1
        assert refused is not None, f"{REQUESTS_MAX} requests fitted in {CEILING} bytes"
        assert answered > 100  # the map grew instead of failing at its first size
        for _ in range(20):  # full stays full: every further new request is a 96
            assert link.exchange(authorization(amount=1))["39"] == "96"

        status, body = get(daemon, "/readyz")
        assert (status, body["ready"], body["reason"]) == (503, False, "ledger_full")
        assert link.exchange(echo_test())["39"] == "00"  # echo tests need no room
        status, body = get(daemon, "/v1/controls")  # the API's reads go on
        assert status == 200, body

        metrics = scrape(daemon)
        assert sample(metrics, "processor_ledger_map_ceiling_bytes") == CEILING
        assert sample(metrics, "processor_ledger_map_size_bytes") == CEILING  # grown, once
        full_series = 'processor_requests_total{mti="0100",reason="ledger_full",response_code="96"}'
        assert sample(metrics, full_series) == 21
        link.close()
    finally:
        daemon.stop()
    log = daemon.stderr()
    assert "map full at 1 MiB, grown to 2 MiB (ceiling 2 MiB" in log
    assert log.count("ledger full at its ceiling of 2 MiB") == 1
    assert log.count("answered 96: ledger_full") <= 5  # a burst, then one a minute

    # Room again (here: a higher ceiling): the identity answered 96 is decided as new.
    config(settings, 64 << 20)
    daemon = RunningDaemon(tmp_path / "ledger", settings, env).start()
    try:
        link = daemon.connect()
        again = link.exchange(refused)
        assert again["39"] == "00" and "38" in again  # decided now, with an approval code
        assert link.exchange(refused) == again  # and now stored: a repeat gets it back
        status, body = get(daemon, "/readyz")
        assert (status, body) == (200, {"ready": True})
        link.close()
    finally:
        daemon.stop()


def test_a_backup_taken_under_load_restores_verifies_and_replays_every_earlier_answer(
    tmp_path: Path,
) -> None:
    daemon = RunningDaemon(tmp_path / "ledger").start()
    answered: list[tuple[dict[str, str], bytes]] = []
    stop = threading.Event()
    failure: list[BaseException] = []

    def load() -> None:  # distinct authorisations on a link of their own, until stopped
        try:
            link = daemon.connect()
            deadline = time.monotonic() + LOAD_SECONDS_MAX
            for _ in range(LOAD_REQUESTS_MAX):
                if stop.is_set() or time.monotonic() > deadline:
                    break
                request = authorization(amount=1)
                link.send_fields(request)
                answered.append((request, link.receive()))
            link.close()
        except BaseException as error:  # reported by the test, not lost in the thread
            failure.append(error)

    loader = threading.Thread(target=load)
    loader.start()
    backup = tmp_path / "backup"
    try:
        while len(answered) < 200 and loader.is_alive():
            time.sleep(0.01)
        before = list(answered)  # answered before the backup began: all must be in it
        copied = run_cli("ledger", "backup", "--ledger", str(daemon.ledger), str(backup))
        assert copied.returncode == 0, copied.stderr
        assert "every change up to event" in copied.stdout
        while len(answered) < len(before) + 100 and loader.is_alive():
            time.sleep(0.01)  # the load went on during and after the copy
    finally:
        stop.set()
        loader.join(timeout=60)
        daemon.stop()
    assert not failure, failure
    assert len(before) >= 200 and len(answered) > len(before)
    refused = run_cli("ledger", "backup", "--ledger", str(daemon.ledger), str(backup))
    assert refused.returncode == 1 and "not an empty directory" in refused.stderr

    restored = tmp_path / "restored"
    shutil.copytree(backup, restored)
    checked = run_cli("ledger", "verify", "--ledger", str(restored))
    assert checked.returncode == 0, checked.stderr
    assert "verified:" in checked.stdout
    stats = run_cli("ledger", "stats", "--ledger", str(restored))
    assert stats.returncode == 0, stats.stderr
    outbox = next(line for line in stats.stdout.splitlines() if line.startswith("outbox "))
    assert int(outbox.split()[1]) >= len(before)  # an event per answered authorisation
    daemon = RunningDaemon(restored).start()
    try:
        link = daemon.connect()
        for request, answer in before:
            link.send_fields(request)
            assert link.receive() == answer  # byte for byte, from the restored ledger
        assert link.exchange(authorization(amount=1))["39"] == "00"  # and it goes on
        link.close()
    finally:
        daemon.stop()
    # The restored ledger's new events are named apart from those the original went on with.
    listed = run_cli("events", "list", "--ledger", str(restored), "--limit", "100000")
    assert listed.returncode == 0, listed.stderr
    ids = [json.loads(line)["id"] for line in listed.stdout.splitlines()]
    first, last = ids[0], ids[-1]
    assert first[:12] != last[:12] and len({event[:12] for event in ids[:-1]}) == 1
