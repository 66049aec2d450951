"""The real daemon over a real socket: authorisations, bad input, durability, shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    PAN_KEY,
    Link,
    RunningDaemon,
    authorization,
    decode,
    echo_test,
    next_stan,
    run_cli,
    run_serve,
)

pytestmark = pytest.mark.e2e


def test_echo_and_sign_on(link: Link) -> None:
    response = link.exchange(echo_test())
    assert (response["t"], response["39"], response["70"]) == ("0810", "00", "301")
    sign_on = {"t": "0800", "7": "1124101010", "11": next_stan(), "70": "001"}
    assert link.exchange(sign_on)["39"] == "00"
    unknown = {"t": "0800", "7": "1124101010", "11": next_stan(), "70": "999"}
    assert link.exchange(unknown)["39"] == "12"


def test_approval_echoes_fields_and_holds(daemon: RunningDaemon, link: Link) -> None:
    request = authorization(amount=2500)
    response = link.exchange(request)
    assert response["t"] == "0110"
    assert response["39"] == "00"
    assert re.fullmatch(r"[0-9A-Z]{6}", response["38"])
    for field in ("2", "3", "4", "7", "11", "32", "37", "41", "42", "49"):
        assert response[field] == request[field], field
    shown = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--account", "demo-main")
    assert shown.returncode == 0, shown.stderr
    assert "25.00 EUR" in shown.stdout
    assert response["38"] in shown.stdout


def test_balance_inquiry_returns_field_54(link: Link) -> None:
    response = link.exchange(authorization(amount=0, **{"3": "310000"}))
    assert response["39"] == "00"
    blocks = [response["54"][i : i + 20] for i in range(0, len(response["54"]), 20)]
    assert [block[2:4] for block in blocks] == ["01", "02"]
    assert all(block[4:7] == "978" and block[7] == "C" for block in blocks)
    assert len(response["38"]) == 6  # an approval carries its code, though it holds nothing


def test_many_requests_in_flight_on_several_links(daemon: RunningDaemon) -> None:
    links = [daemon.connect() for _ in range(4)]
    try:
        sent: dict[int, set[str]] = {}
        for number, link in enumerate(links):
            stans = set()
            for _ in range(150):
                request = authorization(pan="4761739001010085", amount=1)
                link.send_fields(request)
                stans.add(request["11"])
            sent[number] = stans
        for number, link in enumerate(links):
            answered = {link.receive_fields()["11"] for _ in range(150)}
            assert answered == sent[number]
    finally:
        for link in links:
            link.close()
    metrics = http_get(daemon, "/metrics")
    batch_count = metric_value(metrics, "processor_commit_batch_size_count")
    assert batch_count < 600  # group commit: fewer commits than requests


def test_format_error_is_answered_30_and_link_survives(daemon: RunningDaemon, link: Link) -> None:
    request = authorization()
    del request["18"]  # MCC is mandatory in an 0100
    response = link.exchange(request)
    assert (response["t"], response["39"], response["11"]) == ("0110", "30", request["11"])
    # bad digits in a numeric field
    bad = authorization()
    message = link.codec.encode(dict(bad, **{"3": "000000"})).replace(b"000000", b"00A000", 1)
    link.send_message(message)
    response = decode(link.receive())
    assert (response["39"], response["11"]) == ("30", bad["11"])
    # letters in the amount and a minute of 80 are format errors too, not 13 or a time
    for field, value in (("4", "0000000012A4"), ("7", "1124108010")):
        broken = authorization(**{field: value})
        response = link.exchange(broken)
        assert (response["39"], response["11"], response.get(field)) == ("30", broken["11"], None)
    assert link.exchange(echo_test())["39"] == "00"
    metrics = http_get(daemon, "/metrics")
    for field, count in (("18", 1), ("3", 1), ("4", 1), ("7", 1)):
        labels = f'field="{field}",kind="format_error",listener="network"'
        series = f"processor_bad_messages_total{{{labels}}}"
        assert metric_value(metrics, series) == count, field


def test_undecodable_message_is_dropped_and_link_survives(
    daemon: RunningDaemon, link: Link
) -> None:
    assert link.exchange(echo_test())["39"] == "00"  # the link speaks the listener's dialect
    link.send_message(b"GARBAGE!")
    link.send_message(b"0100zzzz")
    assert link.exchange(echo_test())["39"] == "00"
    metrics = http_get(daemon, "/metrics")
    # The field at fault is a label: t = the MTI, p = the primary bitmap.
    for field in ("t", "p"):
        series = f'{{field="{field}",kind="undecodable",listener="network"}}'
        assert metric_value(metrics, "processor_bad_messages_total" + series) == 1


def test_a_peer_in_another_dialect_is_closed_at_once_with_the_cause_logged(
    daemon: RunningDaemon,
) -> None:
    binary = Link(daemon.port, bitmap="binary")  # on the ascii listener
    binary.send_fields(echo_test())
    assert binary.is_closed_by_peer()  # closed, not left waiting for its own timeout
    binary.close()
    assert "likely cause: binary bitmap on an ascii listener" in daemon.stderr()
    metrics = http_get(daemon, "/metrics")
    series = 'processor_links_closed_total{listener="network",reason="dialect_mismatch"}'
    assert metric_value(metrics, series) >= 1


def test_bad_message_rate_closes_the_link(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text("[[listeners]]\nname = 'network'\nbad_messages_max = 3\n")
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        link = running.connect()
        assert link.exchange(echo_test())["39"] == "00"
        link.send_message(b"NOT ISO")
        link.send_message(b"NOT ISO")
        assert link.exchange(echo_test())["39"] == "00"  # two within the window: still up
        link.send_message(b"NOT ISO")
        assert link.is_closed_by_peer()
        link.close()
        other = running.connect()
        assert other.exchange(echo_test())["39"] == "00"
        other.close()
    finally:
        running.stop()


def test_oversize_frame_closes_only_that_link(daemon: RunningDaemon) -> None:
    bad, good = daemon.connect(), daemon.connect()
    try:
        bad.send_raw(b"\xff\xff" + b"0" * 100)
        assert bad.is_closed_by_peer()
        assert good.exchange(echo_test())["39"] == "00"
    finally:
        bad.close()
        good.close()


def test_kill9_after_approval_keeps_the_hold(daemon: RunningDaemon) -> None:
    link = daemon.connect()
    request = authorization(amount=4321)
    first = link.send_fields(request) and link.receive()
    fields = decode(first)
    assert fields["39"] == "00"
    daemon.kill9()  # no chance to flush anything: what was answered must already be on disk
    link.close()

    restarted = RunningDaemon(daemon.ledger).start()
    try:
        shown = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--account", "demo-main")
        assert "43.21 EUR" in shown.stdout
        assert fields["38"] in shown.stdout
        again = restarted.connect()
        again.send_fields(request)
        assert again.receive() == first  # retransmission after restart: same bytes
        again.close()
        shown_after = run_cli(
            "ledger", "show", "--ledger", str(daemon.ledger), "--account", "demo-main"
        )
        assert "open holds: 1\n" in shown_after.stdout
    finally:
        restarted.stop()


def test_sigterm_finishes_in_flight_and_closes_cleanly(daemon: RunningDaemon) -> None:
    link = daemon.connect()
    requests = [authorization(pan="4761739001010085", amount=1) for _ in range(50)]
    for request in requests:
        link.send_fields(request)
    answered = {link.receive_fields()["11"] for _ in requests}
    assert answered == {r["11"] for r in requests}
    assert daemon.terminate() == 0
    assert "processor: stopped" in "".join(daemon.stdout)
    link.close()
    shown = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--account", "demo-main")
    assert "open holds: 50\n" in shown.stdout


def test_ledger_load_while_running(daemon: RunningDaemon, link: Link, tmp_path: Path) -> None:
    cards = tmp_path / "cards.toml"
    cards.write_text(
        '[[accounts]]\nid = "acct-new"\ncurrency = "EUR"\nbalance = 10000\n\n'
        '[[cards]]\npan = "4761739001010093"\naccount = "acct-new"\nexpiry = "3012"\n'
    )
    assert link.exchange(authorization(pan="4761739001010093"))["39"] == "14"
    loaded = run_cli("ledger", "load", "--ledger", str(daemon.ledger), str(cards))
    assert loaded.returncode == 0, loaded.stderr
    assert "accounts 1 created" in loaded.stdout
    assert link.exchange(authorization(pan="4761739001010093", amount=10000))["39"] == "00"
    assert link.exchange(authorization(pan="4761739001010093", amount=1))["39"] == "51"
    again = run_cli("ledger", "load", "--ledger", str(daemon.ledger), str(cards))
    assert "accounts 0 created, 1 updated; cards 0 created, 1 updated" in again.stdout
    shown = run_cli(
        "ledger", "show", "--ledger", str(daemon.ledger), "--pan-stdin", stdin="4761739001010093\n"
    )
    assert "476173******0093" in shown.stdout
    assert "4761739001010093" not in shown.stdout
    assert "100.00 EUR" in shown.stdout  # held; loading twice doubled nothing


def test_metrics_and_health(daemon: RunningDaemon, link: Link) -> None:
    link.exchange(authorization())
    link.exchange(authorization(pan="4761739001010028"))
    metrics = http_get(daemon, "/metrics")
    approved = 'processor_requests_total{mti="0100",reason="approved",response_code="00"}'
    lost = 'processor_requests_total{mti="0100",reason="card_lost",response_code="41"}'
    assert metric_value(metrics, approved) == 1
    assert metric_value(metrics, lost) == 1
    assert 'processor_request_latency_seconds_bucket{le="0.0001",mti="0100"}' in metrics
    assert metric_value(metrics, 'processor_open_links{listener="network"}') == 1
    assert metric_value(metrics, "processor_commit_seconds_count") >= 1
    assert metric_value(metrics, "processor_ledger_map_used_bytes") > 0
    assert "4761739001010" not in metrics
    assert json.loads(http_get(daemon, "/readyz")) == {"ready": True}
    health = json.loads(http_get(daemon, "/healthz"))
    assert health["status"] == "ok" and health["links"] == 1
    with pytest.raises(urllib.error.HTTPError) as caught:
        http_get(daemon, "/nope")
    assert caught.value.code == 404
    assert json.loads(caught.value.read())["error"]["code"] == "not_found"
    caught.value.close()


def test_simulator_scenarios_pass(daemon: RunningDaemon) -> None:
    for _ in range(2):  # scenarios leave the demo data usable for another run
        result = run_cli("sim", "--port", str(daemon.port))
        assert result.returncode == 0, result.stdout + result.stderr
        assert " 0 failed" in result.stdout
        assert "MISMATCH" not in result.stdout


def test_simulator_reports_a_mismatch(daemon: RunningDaemon, tmp_path: Path) -> None:
    # Freeze the card the "approve" scenario uses: the simulator must notice and fail.
    frozen = tmp_path / "freeze.toml"
    frozen.write_text(
        '[[accounts]]\nid = "demo-main"\ncurrency = "EUR"\nbalance = 100000000000\n\n'
        '[[cards]]\npan = "4761739001010010"\naccount = "demo-main"\nexpiry = "3012"\n'
        'status = "frozen"\n'
    )
    assert run_cli("ledger", "load", "--ledger", str(daemon.ledger), str(frozen)).returncode == 0
    result = run_cli("sim", "--port", str(daemon.port), "approve", "echo")
    assert result.returncode == 1
    assert "MISMATCH" in result.stdout


def test_load_generator_reports_percentiles(daemon: RunningDaemon, tmp_path: Path) -> None:
    report = tmp_path / "load.json"
    result = run_cli(
        "sim",
        "load",
        "--port",
        str(daemon.port),
        "--rate",
        "500",
        "--duration",
        "1",
        "--connections",
        "2",
        "--json",
        str(report),
    )
    assert result.returncode == 0, result.stdout + result.stderr + daemon.stderr()
    data = json.loads(report.read_text())
    assert data["sent"] == data["answered"] == 500
    assert data["response_codes"] == {"00": 500}
    assert set(data["latency_us"]) == {"p50", "p90", "p99", "p99.9", "max"}
    assert 0 < data["latency_us"]["p50"] <= data["latency_us"]["max"]


def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[ledger]\ndurabilty = 'fsync'\n")
    result = run_cli("serve", "--config", str(config), "--ledger", str(tmp_path / "l"))
    assert result.returncode == 2
    assert "durabilty" in result.stderr and "$.ledger" in result.stderr


def test_insecure_key_warning_and_key_mismatch(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PROCESSOR_PAN_KEY"}
    running = RunningDaemon(tmp_path / "ledger", env=env).start()
    running.stop()
    assert "INSECURE" in running.stderr()
    # The ledger was keyed with the development key: another key must be refused, loudly.
    result = run_serve(
        tmp_path / "ledger", "--demo", env=dict(env, PROCESSOR_PAN_KEY=PAN_KEY + "-other")
    )
    assert result.returncode == 2  # what keeps the daemon from starting exits 2
    assert "another PAN key" in result.stderr


THREE_LISTENERS = """
[[listeners]]
name = "network"
port = 0
[[listeners]]
name = "binary-net"
port = 0
framing = "ascii4"
bitmap = "binary"
[[listeners]]
name = "headered"
port = 0
framing = "len2_inclusive"
header_bytes = 4
"""


def test_each_listener_speaks_its_own_dialect(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text(THREE_LISTENERS)
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        assert set(running.ports) == {"network", "binary-net", "headered"}
        links = {
            "network": Link(running.ports["network"]),
            "binary-net": Link(running.ports["binary-net"], prefix="ascii4", bitmap="binary"),
            "headered": Link(running.ports["headered"], prefix="len2_inclusive", header=b"HDR1"),
        }
        for name, link in links.items():
            assert link.exchange(echo_test())["39"] == "00", name
            assert link.exchange(authorization())["39"] == "00", name
        assert links["headered"].last_header == b"HDR1"  # echoed back
        # A peer in the ascii dialect on the binary listener is closed there, not elsewhere.
        wrong = Link(running.ports["binary-net"], prefix="ascii4")
        wrong.send_fields(echo_test())
        assert wrong.is_closed_by_peer()
        wrong.close()
        assert "likely cause: ascii bitmap on a binary listener" in running.stderr()
        metrics = http_get(running, "/metrics")
        for name, link in links.items():
            assert metric_value(metrics, f'processor_open_links{{listener="{name}"}}') == 1
            link.close()
        closed = 'processor_links_closed_total{listener="binary-net",reason="dialect_mismatch"}'
        assert metric_value(metrics, closed) == 1
    finally:
        running.stop()


def http_get(daemon: RunningDaemon, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}{path}", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not exposed")


def test_ledger_show_refuses_another_pan_key(daemon: RunningDaemon) -> None:
    import os

    other = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY + "-other")
    other["CARD_TO_SHOW"] = "4761739001010010"
    shown = run_cli(
        "ledger", "show", "--ledger", str(daemon.ledger), "--pan-env", "CARD_TO_SHOW", env=other
    )
    assert shown.returncode == 1
    assert "another PAN key" in shown.stderr


def test_ledger_show_never_takes_a_pan_from_argv(daemon: RunningDaemon) -> None:
    pan = "4761739001010010"
    refused = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--pan", pan)
    assert refused.returncode == 2
    assert "visible to every user" in refused.stderr and pan not in refused.stderr
    assert refused.stdout == ""
    for stdin in ("", "47617390\n", "4761739001010010 extra\n"):
        bad = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--pan-stdin", stdin=stdin)
        assert bad.returncode == 2 and "does not hold a PAN" in bad.stderr, stdin
    by_stdin = run_cli(
        "ledger", "show", "--ledger", str(daemon.ledger), "--pan-stdin", stdin=pan + "\n"
    )
    assert by_stdin.returncode == 0, by_stdin.stderr
    card_id = by_stdin.stdout.split("card ", 1)[1].split()[0]
    by_id = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--card", card_id)
    assert by_id.returncode == 0 and by_id.stdout == by_stdin.stdout
    assert pan not in by_stdin.stdout


def test_version_and_python_dash_m() -> None:
    import subprocess
    import sys

    from processor import __version__

    for command in (["-m", "processor", "--version"], ["-m", "processor.cli", "--version"]):
        shown = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, timeout=60, check=False
        )
        assert shown.returncode == 0 and shown.stdout.strip() == f"processor {__version__}"


def test_what_keeps_the_daemon_from_starting_is_one_line_and_exit_2(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    # The ISO port of a running daemon is taken; a ledger under a file cannot be created.
    taken = run_serve(tmp_path / "other", "--port", str(daemon.port), "--demo")
    assert taken.returncode == 2
    assert (
        f"processor: cannot listen on 127.0.0.1:{daemon.port} (listener network): " in taken.stderr
    )
    assert "Traceback" not in taken.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    under_a_file = run_serve(blocker / "ledger", "--demo")
    assert under_a_file.returncode == 2
    assert "processor: ledger " in under_a_file.stderr and "cannot create" in under_a_file.stderr
    assert "Traceback" not in under_a_file.stderr


def test_a_production_start_refuses_what_is_missing_in_one_line(tmp_path: Path) -> None:
    import os

    bare = {
        k: v for k, v in os.environ.items() if k not in ("PROCESSOR_PAN_KEY", "PROCESSOR_API_TOKEN")
    }
    refused = run_serve(tmp_path / "ledger", env=bare)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr
    for named in ("PROCESSOR_PAN_KEY", "PROCESSOR_API_TOKEN", "card_issuing.bin_prefix", "--demo"):
        assert named in lines[0], named
    assert not (tmp_path / "ledger").exists()  # refused before anything was created
    short_key = run_serve(
        tmp_path / "ledger",
        env=dict(bare, PROCESSOR_PAN_KEY="too-short", PROCESSOR_API_TOKEN="a" * 32),
    )
    assert short_key.returncode == 2 and "PROCESSOR_PAN_KEY holds 9 bytes" in short_key.stderr
    assert "too-short" not in short_key.stderr


def test_a_production_start_has_no_demo_data(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text(
        "[programme.card_issuing]\nbin_prefix = '53999900'\n"
        "[[security.card_verification_keys]]\nbin_prefix = '539999'\nkey_envs = ['CVK']\n"
    )
    cvk = "89ABCDEF0123456776543210FEDCBA98"
    env = dict(
        os.environ,
        PROCESSOR_PAN_KEY=PAN_KEY,
        PROCESSOR_API_TOKEN="p" * 24,
        CVK=cvk,
        PROCESSOR_DATA_KEY="5a" * 32,
        PROCESSOR_PAN_VAULT_KEY="6b" * 32,
    )
    running = RunningDaemon(tmp_path / "ledger", config=config, env=env, demo=False).start()
    try:
        assert any("(durability fsync, 0 accounts)" in line for line in running.stdout)
        assert not any("DEMO" in line or "token" in line for line in running.stdout)
        link = running.connect()
        assert link.exchange(authorization())["39"] == "14"  # no such card: nothing was seeded
        link.close()
    finally:
        running.stop()
    assert "INSECURE" not in running.stderr()


def test_demo_announces_itself_and_a_token_made_up_for_this_run(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if k != "PROCESSOR_API_TOKEN"}
    env["PROCESSOR_PAN_KEY"] = PAN_KEY
    running = RunningDaemon(tmp_path / "ledger", env=env).start()
    try:
        text = "".join(running.stdout)
        assert "DEMO mode, never for real cards" in text and "BIN 476173" in text
        token = text.split("demo control API token (this run only): ", 1)[1].split()[0]
        assert len(token) >= 16
        request = urllib.request.Request(
            f"http://127.0.0.1:{running.http_port}/v1/accounts/demo-main",
            headers={"Authorization": f"Bearer {token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
    finally:
        running.stop()
    assert token not in running.stderr()  # printed once, on stdout, never logged


def test_idle_and_half_sent_links_are_closed_over_real_sockets(tmp_path: Path) -> None:
    import time

    config = tmp_path / "processor.toml"
    config.write_text(
        "[[listeners]]\nname = 'network'\nport = 0\n"
        "idle_timeout_seconds = 2.0\npartial_frame_timeout_seconds = 1.0\n"
    )
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        idle, chatty, half = running.connect(), running.connect(), running.connect()
        half.send_raw(b"\x00\x40" + b"0100")  # 64 bytes announced, 4 sent
        # `chatty` keeps talking while `half` waits for its sweep: the sweep that closes `half`
        # (after 1 s, so up to 2 s with a sweep a second) would find `chatty` idle for as long.
        for _ in range(20):  # within the 1 s timeout and a sweep: well before 5 s
            assert chatty.exchange(echo_test())["39"] == "00"
            if half.is_closed_by_peer(timeout=0.25):
                break
        else:
            raise AssertionError("the half-sent link was not closed")
        for _ in range(6):  # 3 s of echo tests every 0.5 s: past the idle timeout, still up
            assert chatty.exchange(echo_test())["39"] == "00"
            time.sleep(0.5)
        assert idle.is_closed_by_peer(timeout=1.0)  # idle for 3 s already: gone
        assert chatty.exchange(echo_test())["39"] == "00"
        for link in (idle, chatty, half):
            link.close()
        metrics = http_get(running, "/metrics")
        for reason in ("idle_timeout", "partial_frame_timeout"):
            series = f'processor_links_closed_total{{listener="network",reason="{reason}"}}'
            assert metric_value(metrics, series) == 1, reason
    finally:
        running.stop()


def _serving(
    ledger: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], object] | None = None,
) -> subprocess.Popen[str]:
    """`processor serve --demo` on free ports, its stdout a pipe this test reads (or closes),
    in a session of its own (a signal to its process group reaches nothing of the test's)."""
    command = [sys.executable, "-m", "processor.cli", "serve", "--demo", "--ledger", str(ledger)]
    return subprocess.Popen(
        [*command, "--port", "0", "--http-port", "0", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY) if env is None else env,
        start_new_session=True,
        preexec_fn=preexec_fn,
    )


@contextlib.contextmanager
def _reaped(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """The process, killed on the way out if the test left it running."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _line_until(process: subprocess.Popen[str], start: str) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, "the daemon exited during its start"
        if line.startswith(start):
            return
    raise AssertionError(f"no {start!r} within 60 s")


def test_a_sigterm_during_the_start_ends_in_the_orderly_stop(tmp_path: Path) -> None:
    # The handlers came just before "ready": a SIGTERM once the ports were bound (links could
    # be answered already) killed the daemon (-15) without its drain and checkpoint.
    with _reaped(_serving(tmp_path / "ledger")) as process:
        _line_until(process, "processor: ISO 8583 listening")
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "processor: stopped" in out and "Traceback" not in err


def test_a_stdout_nobody_reads_any_more_does_not_stop_the_stop(tmp_path: Path) -> None:
    # The reader of stdout gone (a closed pipe): "stopping" raised BrokenPipeError, and the
    # daemon exited 1 without draining or checkpointing.
    with _reaped(_serving(tmp_path / "ledger")) as process:
        _line_until(process, "processor: ready")
        assert process.stdout is not None
        process.stdout.close()
        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        err = process.stderr.read()
        process.stderr.close()
        process.wait(timeout=60)
    assert process.returncode == 0, err
    assert "stdout cannot be written" in err and "Traceback" not in err


def test_a_bad_webhook_url_stops_the_start_before_any_port_is_bound(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text(
        "[[webhooks.endpoints]]\nname = 'main'\nurl = 'http://'\nsecret_envs = ['HOOK']\n"
    )
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK="whsec_" + "A" * 40)
    result = run_serve(tmp_path / "ledger", "--demo", "--config", str(config), env=env)
    assert result.returncode == 2
    assert "$.webhooks.endpoints[0].url" in result.stderr
    assert "listening" not in result.stdout


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.3])
def test_ctrl_c_while_the_delivery_process_starts_is_the_orderly_stop(
    tmp_path: Path, delay: float
) -> None:
    # Ctrl-C signals the terminal's whole process group: the delivery process, starting, died
    # of it, and the daemon (its ports bound and announced) failed its start with exit 2 and a
    # traceback, never draining or checkpointing.
    config = tmp_path / "processor.toml"
    config.write_text(
        "[[webhooks.endpoints]]\nname = 'main'\nurl = 'http://127.0.0.1:9/'\n"
        "secret_envs = ['HOOK']\n"
    )
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK="whsec_" + "A" * 40)
    with _reaped(_serving(tmp_path / "ledger", "--config", str(config), env=env)) as process:
        _line_until(process, "processor: ISO 8583 listening")
        time.sleep(delay)
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "processor: stopped" in out and "Traceback" not in err


def test_a_daemon_started_under_nohup_goes_on_after_a_sighup(tmp_path: Path) -> None:
    """SIGHUP stops the daemon in order, unless it was started ignoring it (`nohup`): the
    handler replaced the ignore, and a closed terminal stopped what nohup was to keep."""

    def as_nohup_does() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    with _reaped(_serving(tmp_path / "ledger", preexec_fn=as_nohup_does)) as process:
        _line_until(process, "processor: ready")
        process.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert process.poll() is None, "stopped by a SIGHUP it was started to ignore"
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "processor: stopped" in out
