"""Retention on a real daemon (issue 12): with horizons of seconds, what passed them is pruned
while the daemon serves, the ledger stops growing, and what remains still verifies.

Horizons here: holds live 1 s, events are kept 1 s after delivery (no endpoints: at once),
answers 2 s. The hold sweep runs every second and releases the holds; retention then prunes
the answers and events, in the batches' transactions while traffic flows and in steps of its
own when it stops.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from harness import PAN_KEY, RunningDaemon, authorization, run_cli, sample, scrape

TOKEN = "e2e-retention-api-token"
ROUNDS = 12
PER_ROUND = 150
WAIT_SECONDS_MAX = 30.0


def config(path: Path) -> Path:
    path.write_text(
        '[ledger]\ndurability = "process"\n'
        "[programme]\nhold_lifetime_seconds = 1\nhold_lifetime_by_mcc = {}\n"
        "sweep_interval_seconds = 1\n"
        "[retention]\nanswers_seconds = 2\nevents_seconds = 1\n"
    )
    return path


def authorization_status(daemon: RunningDaemon, request: dict[str, str]) -> int:
    key = f"0100|{request['32']}|{request['11']}|{request['7']}"
    url = (
        f"http://127.0.0.1:{daemon.http_port}/v1/authorizations/{urllib.parse.quote(key, safe='')}"
    )
    http = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(http, timeout=10) as response:
            json.loads(response.read())
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_past_their_horizons_records_are_pruned_and_the_ledger_stops_growing(
    tmp_path: Path,
) -> None:
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    daemon = RunningDaemon(tmp_path / "ledger", config(tmp_path / "processor.toml"), env).start()
    used: list[float] = []
    try:
        metrics = scrape(daemon)
        assert sample(metrics, 'processor_retention_horizon_seconds{record="answers"}') == 2
        link = daemon.connect()
        first = authorization(amount=1)
        assert link.exchange(first)["39"] == "00"
        assert authorization_status(daemon, first) == 200
        for _ in range(ROUNDS):  # each round: a burst of distinct approvals, then a pause
            for _ in range(PER_ROUND):
                assert link.exchange(authorization(amount=1))["39"] == "00"
            time.sleep(1.0)
            used.append(sample(scrape(daemon), "processor_ledger_map_used_bytes"))
        sent = 1 + ROUNDS * PER_ROUND
        # Traffic stopped: the idle steps finish the work.
        deadline = time.monotonic() + WAIT_SECONDS_MAX
        while time.monotonic() < deadline:
            metrics = scrape(daemon)
            pruned = sample(metrics, 'processor_retention_pruned_total{record="answers"}', 0)
            if pruned == sent:
                break
            time.sleep(0.2)
        assert pruned == sent, f"{pruned} of {sent} answers pruned in {WAIT_SECONDS_MAX} s"
        assert sample(metrics, 'processor_retention_pruned_total{record="events"}') >= sent
        assert sample(metrics, "processor_holds_expired_total") == sent
        assert authorization_status(daemon, first) == 404  # pruned: not found any more
        # A retransmission after its answer is gone is decided afresh (specs/retention.md).
        again = link.exchange(first)
        assert again["39"] == "00" and again["38"]
        link.close()
    finally:
        daemon.stop()
    # Growth stops: the last three rounds grew the file far less than the first three (about
    # 1 KB per approval without pruning: 150 KB a round). The live set is a few seconds of
    # traffic (hold lifetime, sweep interval, answers' horizon), reached after a few rounds.
    # (LMDB reuses freed pages two transactions later, and the file's high-water mark creeps
    # while its free list settles: half, not zero.)
    early, late = used[3] - used[0], used[-1] - used[-4]
    assert late <= early * 0.5, used
    checked = run_cli("ledger", "verify", "--ledger", str(tmp_path / "ledger"), env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr


FULL_REQUESTS_MAX = 64_000  # far more than the ceiling holds: the loop ends at a 96 first
RECOVERY_SECONDS_MAX = 30.0


def test_a_ledger_full_at_its_ceiling_recovers_by_itself_as_the_sweep_frees_room(
    tmp_path: Path,
) -> None:
    """Issue 12, point 4: full at its ceiling (a request alone answered 96 ledger_full,
    /readyz 503), the daemon is approving again within seconds, without a restart, while
    retention prunes records past their horizon.

    Room comes back from more than the sweep: pages the last commits freed become reusable
    once no reader holds them, and holds expire. The daemon's own retention steps also run
    while it is full (a failed batch commits no sweep); this test does not tell those apart."""
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    settings = tmp_path / "processor.toml"
    settings.write_text(
        '[ledger]\ndurability = "process"\nmap_size_bytes = 1048576\n'
        "map_size_max_bytes = 2097152\n"
        "[programme]\nhold_lifetime_seconds = 1\nhold_lifetime_by_mcc = {}\n"
        "sweep_interval_seconds = 1\n"
        "[retention]\nanswers_seconds = 4\nevents_seconds = 1\n"
    )
    daemon = RunningDaemon(tmp_path / "ledger", settings, env).start()
    try:
        link = daemon.connect()
        full = False
        deadline = time.monotonic() + RECOVERY_SECONDS_MAX
        for _ in range(FULL_REQUESTS_MAX // 64):
            if time.monotonic() > deadline:
                break
            # Pipelined bursts, faster than a 4-second horizon frees room...
            requests = [authorization(amount=1) for _ in range(64)]
            for request in requests:
                link.send_fields(request)
            codes = [link.receive_fields()["39"] for _ in requests]
            # ...until even a request alone does not fit: full, not a burst too big.
            if "96" in codes and link.exchange(authorization(amount=1))["39"] == "96":
                full = True
                break
        assert full, "the ledger never filled"
        pruned_when_full = pruned_records(daemon)
        status, _ = http_status(daemon, "/readyz")
        assert status == 503
        code = "96"
        deadline = time.monotonic() + RECOVERY_SECONDS_MAX
        while time.monotonic() < deadline:
            time.sleep(0.5)
            code = link.exchange(authorization(amount=1))["39"]
            if code == "00":
                break
        assert code == "00", f"still {code} after {RECOVERY_SECONDS_MAX} s"
        assert pruned_records(daemon) > pruned_when_full  # room from records past their horizon
        status, _ = http_status(daemon, "/readyz")
        assert status == 200
        link.close()
    finally:
        daemon.stop()
    log = daemon.stderr()
    assert "ledger full at its ceiling" in log and "ledger no longer full" in log


def pruned_records(daemon: RunningDaemon) -> float:
    metrics = scrape(daemon)
    return sum(
        sample(metrics, f'processor_retention_pruned_total{{record="{record}"}}', 0)
        for record in ("events", "answers", "clearing", "idempotency")
    )


def http_status(daemon: RunningDaemon, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
