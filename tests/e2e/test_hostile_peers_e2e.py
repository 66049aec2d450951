"""Hostile or careless peers against the real daemon over real sockets: zero-length frames,
traffic before sign-on, links refused when descriptors run out, malformed HTTP requests."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from harness import (
    Link,
    RunningDaemon,
    authorization,
    echo_test,
    next_stan,
    sample,
    scrape,
)

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


def test_an_address_whose_links_keep_being_closed_is_refused_and_others_are_not(
    tmp_path: Path,
) -> None:
    config = tmp_path / "processor.toml"
    config.write_text(
        "[[listeners]]\nname = 'network'\nport = 0\nbad_messages_max = 2\n"
        "bad_links_per_address_max = 3\nbad_links_window_seconds = 60\n"
    )
    running = RunningDaemon(tmp_path / "ledger", config=config).start()

    def from_other_address() -> socket.socket:
        # Linux routes all of 127/8 to the loopback: a second peer address on this machine.
        return socket.create_connection(
            ("127.0.0.1", running.port), timeout=5, source_address=("127.0.0.2", 0)
        )

    def closed_by_daemon(sock: socket.socket) -> bool:
        try:
            return sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    try:
        good = running.connect()  # from 127.0.0.1, before and after
        for _ in range(3):
            bad = from_other_address()
            bad.sendall(b"\x00\x04JUNK" * 2)
            assert closed_by_daemon(bad)
            bad.close()
        refused = from_other_address()
        assert closed_by_daemon(refused)  # closed without a word, before it sent anything
        refused.close()
        assert good.exchange(echo_test())["39"] == "00"
        good.close()
        fresh = running.connect()  # a new link from the good address: accepted
        assert fresh.exchange(echo_test())["39"] == "00"
        fresh.close()
        metrics = scrape(running)
        closed = 'processor_links_closed_total{listener="network",reason="bad_peer"}'
        assert sample(metrics, closed) == 1
        assert "refused: bad_peer" in running.stderr()
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


def test_links_refused_at_the_open_files_limit_are_counted_and_accepting_resumes(
    tmp_path: Path,
) -> None:
    # Soft and hard limit 64 in the daemon: about 45 links beside what it opens itself.
    running = RunningDaemon(tmp_path / "ledger", open_files_limit=64).start()
    links: list[Link] = []
    refused = 0
    try:
        for _ in range(64):  # bounded: the limit is reached well before
            link = running.connect()
            try:
                assert link.exchange(echo_test())["39"] == "00"
            except OSError:  # accepted and closed at once (or reset): refused
                link.close()
                refused += 1
                break
            links.append(link)
        assert refused == 1, f"{len(links)} links and none refused"
        for _ in range(3):  # each further one is refused too
            extra = running.connect()
            extra.send_fields(echo_test())
            assert extra.is_closed_by_peer()
            extra.close()
            refused += 1
        # The HTTP port is out of descriptors too: its connections are refused the same way.
        assert _http_answer(running) == b""
        # The links it has are served all the while.
        assert links[0].exchange(echo_test())["39"] == "00"
        assert links[-1].exchange(echo_test())["39"] == "00"
        for link in links[-5:]:  # links go away: descriptors free again
            link.close()
        del links[-5:]
        again, refused_meanwhile = _connect_when_accepted(running)
        refused += refused_meanwhile
        assert again.exchange(echo_test())["39"] == "00"
        links.append(again)
        metrics = scrape(running)
        series = 'processor_links_closed_total{listener="network",reason="open_files_limit"}'
        assert sample(metrics, series) == refused
        series = 'processor_http_connections_refused_total{reason="open_files_limit"}'
        assert sample(metrics, series) >= 1  # and the scrape itself was then served
        log = running.stderr()
        assert "refused on listener network" in log and "open files limit 64" in log
        assert "HTTP connection(s) refused" in log
        assert "Traceback" not in log
    finally:
        for link in links:
            link.close()
        running.stop()


def _http_answer(running: RunningDaemon) -> bytes:
    """What a GET /healthz gets back on a connection of its own (b"": closed unanswered)."""
    with socket.create_connection(("127.0.0.1", running.http_port), timeout=5) as sock:
        try:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(4096)
        except ConnectionResetError:
            return b""


def _connect_when_accepted(running: RunningDaemon) -> tuple[Link, int]:
    """A new link once the daemon has seen links close (bounded: 5 s), and how many tries
    were refused before it (the daemon may not have closed its side yet)."""
    deadline = time.monotonic() + 5.0
    refused = 0
    while True:
        link = running.connect()
        try:
            link.send_fields(echo_test())
            link.receive()
            return link, refused
        except OSError:
            link.close()
            refused += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def http_raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a raw socket, as no HTTP client would send it: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        for _ in range(100):  # bounded: the answer is small and the connection closes
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), headers, body


def test_malformed_http_requests_get_json_errors_one_log_line_and_no_echo(
    tmp_path: Path,
) -> None:
    token = "tok_" + "T" * 9000  # an Authorization header over 8 KB
    running = RunningDaemon(tmp_path / "ledger").start()
    try:
        cases = [
            (
                b"GET /v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + token.encode()
                + b"\r\n\r\n",
                431,
                "header_fields_too_large",
            ),
            (
                b"GET /v1/accounts HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer TTTT\x01SECRET\r\n\r\n",
                400,
                "bad_request",
            ),
            (b"GET /SECRET HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400, "bad_request"),
            (b"GET /" + b"S" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        ]
        for request, status, code in cases:
            answered, headers, body = http_raw(running.http_port, request)
            assert (answered, headers["Content-Type"]) == (status, "application/json"), request
            assert json.loads(body)["error"]["code"] == code
            assert b"TTTT" not in body and b"SECRET" not in body and b"SSSS" not in body
        # The port still serves.
        assert sample(scrape(running), 'processor_open_links{listener="network"}') == 0
    finally:
        running.stop()
    log = running.stderr()
    lines = [line for line in log.splitlines() if '"logger":"processor.api"' in line]
    assert len(lines) == len(cases), lines  # one line each
    assert "Traceback" not in log and "aiohttp" not in log
    assert "TTTT" not in log and "SECRET" not in log and "SSSS" not in log
