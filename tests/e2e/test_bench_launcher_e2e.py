"""The daemon launcher every daemon benchmark uses (bench/run_load.start_daemon) starts a
production daemon: a benchmark that cannot start one measures nothing (after issue 14 they
all stopped at 'daemon did not start' until the launcher gave the new keys)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
pytestmark = pytest.mark.e2e


def test_the_benchmarks_daemon_launcher_starts_a_production_daemon(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        from run_load import start_daemon
    finally:
        sys.path.remove(str(BENCH))
    ports: dict[str, int] = {}
    process, port = start_daemon(
        tmp_path / "ledger", '[ledger]\ndurability = "process"\n', ports=ports
    )
    try:
        assert port > 0 and ports["http"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert process.stdout is not None
        process.stdout.close()
