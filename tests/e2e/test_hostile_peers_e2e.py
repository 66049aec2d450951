"""Hostile or careless peers against the real daemon over real sockets: zero-length frames,
traffic before sign-on, links refused when descriptors run out, malformed HTTP requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import RunningDaemon, authorization, echo_test, next_stan, sample, scrape

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


def sign_on(code: str = "001") -> dict[str, str]:
    return {"t": "0800", "7": "1124101010", "11": next_stan(), "70": code}


def test_a_listener_requiring_sign_on_answers_91_before_it(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text("[[listeners]]\nname = 'network'\nport = 0\nsign_on_required = true\n")
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        link = running.connect()
        assert link.exchange(echo_test())["39"] == "00"  # network management: always
        refused = link.exchange(authorization(amount=700))
        assert (refused["t"], refused["39"]) == ("0110", "91")
        assert "38" not in refused
        advice = authorization(amount=300, t="0120")
        assert link.exchange(advice)["39"] == "91"  # not recorded: the network repeats it
        assert link.exchange(sign_on())["39"] == "00"
        approved = link.exchange(authorization(amount=700))
        assert (approved["t"], approved["39"]) == ("0110", "00")
        assert link.exchange(dict(advice, t="0121"))["39"] == "00"  # the repeat, recorded
        assert link.exchange(sign_on("002"))["39"] == "00"  # signed off: refused again
        assert link.exchange(authorization(amount=700))["39"] == "91"
        other = running.connect()  # a link of its own: not signed on
        assert other.exchange(authorization(amount=700))["39"] == "91"
        for each in (link, other):
            each.close()
        metrics = scrape(running)
        series = 'processor_requests_total{mti="0100",reason="not_signed_on",response_code="91"}'
        assert sample(metrics, series) == 3
        series = 'processor_requests_total{mti="0120",reason="not_signed_on",response_code="91"}'
        assert sample(metrics, series) == 1
        assert "before sign-on" in running.stderr()
        assert "4761739001010010" not in running.stderr()
    finally:
        running.stop()
