"""Fixtures: a fresh real daemon (subprocess, port 0, own ledger) and a link to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Link, RunningDaemon


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(tmp_path / "ledger").start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def link(daemon: RunningDaemon) -> Iterator[Link]:
    connection = daemon.connect()
    try:
        yield connection
    finally:
        connection.close()
