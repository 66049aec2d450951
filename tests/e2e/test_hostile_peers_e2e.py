"""Hostile or careless peers against the real daemon over real sockets: zero-length frames,
traffic before sign-on, links refused when descriptors run out, malformed HTTP requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import RunningDaemon, echo_test, sample, scrape

pytestmark = pytest.mark.e2e


def test_zero_length_frames_are_counted_and_close_the_link_at_the_rate(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text("[[listeners]]\nname = 'network'\nport = 0\nbad_messages_max = 3\n")
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        link = running.connect()
        link.send_raw(b"\x00\x00\x00\x00")  # two, before anything else: no dialect to blame
        assert link.exchange(echo_test())["39"] == "00"  # still up
        link.send_raw(b"\x00\x00")  # the third within the window
        assert link.is_closed_by_peer()
        link.close()
        other = running.connect()  # only that link
        assert other.exchange(echo_test())["39"] == "00"
        other.close()
        metrics = scrape(running)
        series = 'processor_bad_messages_total{field="",kind="zero_length",listener="network"}'
        assert sample(metrics, series) == 3
        closed = 'processor_links_closed_total{listener="network",reason="bad_message_rate"}'
        assert sample(metrics, closed) == 1
        assert "zero-length frame" in running.stderr()
    finally:
        running.stop()
