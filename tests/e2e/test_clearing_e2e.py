"""`processor clearing ingest` against the ledger of a running daemon (specs/clearing.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from harness import Link, RunningDaemon, authorization, run_cli

pytestmark = pytest.mark.e2e

MAIN = "4761739001010010"  # demo-main, EUR 1 000 000 000.00
UNKNOWN = "4761739001010903"  # Luhn-valid, not a demo card


def clearing_file(path: Path, *records: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def ingest(daemon: RunningDaemon, path: Path) -> str:
    done = run_cli("clearing", "ingest", "--ledger", str(daemon.ledger), str(path))
    assert done.returncode == 0, done.stderr
    for pan in (MAIN, UNKNOWN):
        assert pan not in done.stdout and pan not in done.stderr
    return done.stdout


def show_main(daemon: RunningDaemon) -> str:
    shown = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--account", "demo-main")
    assert shown.returncode == 0, shown.stderr
    return shown.stdout


def ledger_balance(link: Link) -> int:
    """Posted balance of demo-main as the daemon answers it (field 54, amount type 01)."""
    response = link.exchange(authorization(pan=MAIN, amount=0, **{"3": "310000"}))
    assert response["39"] == "00"
    block = response["54"][:20]
    assert block[2:4] == "01" and block[7] == "C"
    return int(block[8:20])


def test_clearing_captures_the_hold_while_the_daemon_runs(
    daemon: RunningDaemon, link: Link, tmp_path: Path
) -> None:
    posted = ledger_balance(link)
    original = authorization(pan=MAIN, amount=2500, **{"37": "633012000777"})
    response = link.exchange(original)
    assert response["39"] == "00"
    before = show_main(daemon)
    assert "open holds: 1" in before
    assert response["38"] in before

    path = clearing_file(
        tmp_path / "presentments.jsonl",
        {
            "record_id": "e2e-1",
            "type": "purchase",
            "pan": MAIN,
            "acquirer": original["32"],
            "stan": original["11"],
            "transmission_datetime": original["7"],
            "rrn": original["37"],
            "amount": 2750,  # with a tip
            "currency": "EUR",
        },
        {
            "record_id": "e2e-2",
            "type": "refund",
            "pan": MAIN,
            "acquirer": "123456",
            "stan": "999001",
            "transmission_datetime": "1124101010",
            "amount": 1000,
            "currency": "EUR",
        },
        {
            "record_id": "e2e-3",
            "type": "purchase",
            "pan": UNKNOWN,
            "acquirer": "123456",
            "stan": "999002",
            "transmission_datetime": "1124101010",
            "amount": 100,
            "currency": "EUR",
        },
    )
    out = ingest(daemon, path)
    assert "  matched           1" in out
    assert "  refunds           1" in out
    assert "  rejected          1" in out
    assert "rejected line 3 record_id e2e-3: unknown_card" in out

    after = show_main(daemon)
    assert "open holds: 0" in after
    holds_section = after.split("open holds:")[1].split("  cards:")[0]
    assert response["38"] not in holds_section  # listed in the card's history, not as a hold
    assert re.search(r"^  held +0\.00 EUR$", after, re.MULTILINE)
    assert re.search(r"^  posted +999999982\.50 EUR$", after, re.MULTILINE)  # -27.50 +10.00
    assert ledger_balance(link) == posted - 2750 + 1000  # the daemon sees the new balance

    # The same file again: duplicates, nothing changes.
    again = ingest(daemon, path)
    assert "  duplicates        2" in again
    assert "  matched           0" in again
    # Balances and holds unchanged (the card histories grow with the balance inquiries above).
    assert show_main(daemon).split("  cards:")[0] == after.split("  cards:")[0]
    assert ledger_balance(link) == posted - 1750

    # The daemon keeps deciding on the same ledger.
    assert link.exchange(authorization(pan=MAIN, amount=100))["39"] == "00"
    assert "open holds: 1" in show_main(daemon)


def test_clearing_file_that_cannot_be_read_exits_1(daemon: RunningDaemon, tmp_path: Path) -> None:
    done = run_cli(
        "clearing", "ingest", "--ledger", str(daemon.ledger), str(tmp_path / "missing.jsonl")
    )
    assert done.returncode == 1
    assert "cannot read" in done.stderr
    usage = run_cli("clearing", "ingest", "--ledger", str(daemon.ledger))
    assert usage.returncode == 2
