"""The outbox against the real daemon: after a kill -9, every answered request has its event."""

from __future__ import annotations

import json

import pytest
from harness import RunningDaemon, authorization, run_cli

from processor.ledger.store import Ledger

pytestmark = pytest.mark.e2e


def test_kill9_keeps_an_event_for_every_answered_request(daemon: RunningDaemon) -> None:
    link = daemon.connect()
    requests = [
        authorization(pan="4761739001010085" if n % 3 else "4761739001010069", amount=4000)
        for n in range(60)
    ]
    for request in requests:
        link.send_fields(request)
    answered = {}
    for _ in requests:
        response = link.receive_fields()
        answered[response["11"]] = response["39"]
    daemon.kill9()  # nothing after the last answer can be flushed
    link.close()
    assert set(answered.values()) == {"00", "51"}  # approvals and declines both
    # The last milliseconds of batches may be in the write-ahead log only: a read-only tool
    # says so and cannot show them; a read-write open replays them (as the restart would).
    Ledger(daemon.ledger).close()

    listed = run_cli("events", "list", "--ledger", str(daemon.ledger), "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    by_stan = {e["data"]["network"]["stan"]: e for e in events if "network" in e["data"]}
    assert set(by_stan) == set(answered)
    for stan, code in answered.items():
        event = by_stan[stan]
        assert event["data"]["response_code"] == code
        expected = "authorization.approved" if code == "00" else "authorization.declined"
        assert event["type"] == expected
    assert len({e["id"] for e in events}) == len(events)
    assert "4761739001010085" not in listed.stdout

    restarted = RunningDaemon(daemon.ledger).start()
    try:
        again = restarted.connect()
        again.send_fields(requests[0])  # a retransmission after restart: no second event
        again.receive()
        again.close()
    finally:
        restarted.stop()
    relisted = run_cli("events", "list", "--ledger", str(daemon.ledger), "--limit", "1000")
    assert relisted.stdout == listed.stdout
