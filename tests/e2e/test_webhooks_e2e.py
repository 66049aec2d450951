"""Signed webhooks from the real daemon to real HTTP receivers on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from harness import PAN_KEY, RunningDaemon, authorization
from receiver import Receiver
from standardwebhooks.webhooks import Webhook

from processor.webhooks.state import DeliveryState

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
SECRET_NEXT = "whsec_" + base64.b64encode(b"fedcba9876543210fedcba9876543210").decode()


def start(
    tmp_path: Path, endpoints: str, backoff_max_seconds: float = 0.2, **env: str
) -> RunningDaemon:
    config = tmp_path / "processor.toml"
    config.write_text(
        "[webhooks]\nbackoff_initial_seconds = 0.05\n"
        f"backoff_max_seconds = {backoff_max_seconds}\n" + endpoints
    )
    environment = dict(
        os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK_SECRET=SECRET, HOOK_SECRET_NEXT=SECRET_NEXT
    )
    environment.update(env)
    return RunningDaemon(tmp_path / "ledger", config=config, env=environment).start()


def signed_by(headers: dict[str, str], body: bytes, *secrets: str) -> bool:
    """The signature header holds one v1 signature per secret, in order, over the attempt's
    own timestamp (the reference library signs; no clock is read here)."""
    moment = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
    expected = [Webhook(s).sign(headers["webhook-id"], moment, body.decode()) for s in secrets]
    return headers["webhook-signature"] == " ".join(expected)


# The events of network messages. The daemon's load of its demo data at start makes events
# too (programme controls, the accounts' funding: test_every_event_arrives_signed_once_in_order);
# the tests of delivery itself subscribe to the messages' alone, so they count only what they
# send.
# The outbox's first (tests/unit/support.py): the messages' events' sequences start after them.
DEMO_LOAD_EVENTS = 29
MESSAGE_EVENTS = (
    'event_types = ["authorization.approved", "authorization.declined", '
    '"authorization.balance_inquiry", "authorization.advice", "authorization.reversed", '
    '"reversal.orphaned", "authorization.expired", "transaction.posted", '
    '"transaction.completed"]\n'
)


def endpoint(name: str, url: str, extra: str = "", secret_envs: str = '["HOOK_SECRET"]') -> str:
    types = "" if "event_types" in extra else MESSAGE_EVENTS
    return (
        f'[[webhooks.endpoints]]\nname = "{name}"\nurl = "{url}"\nsecret_envs = {secret_envs}\n'
        + types
        + extra
    )


def events_covering(
    receiver: Receiver, stans: set[str], deadline: float
) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """The events received once every STAN in `stans` has one (or at `deadline`), and the
    event ids seen per STAN: at least once, so a STAN may have arrived more than once."""
    while True:
        events = receiver.events()
        if {e["data"]["network"]["stan"] for e in events} >= stans:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    by_stan: dict[str, set[str]] = {}
    for event in events:
        by_stan.setdefault(event["data"]["network"]["stan"], set()).add(event["id"])
    return events, by_stan


def test_every_event_arrives_signed_once_in_order(tmp_path: Path) -> None:
    receiver = Receiver()
    daemon = start(tmp_path, endpoint("main", receiver.url, 'event_types = ["*"]\n'))
    try:
        link = daemon.connect()
        for n in range(12):
            pan = "4761739001010085" if n % 4 else "4761739001010028"  # some declined 41
            assert link.exchange(authorization(pan=pan, amount=100))["39"] in ("00", "41")
        link.close()
        # First the demo data's load at start: its programme controls, each account's
        # creation and funding (a ledger entry), and each card's creation.
        events = receiver.wait_for(DEMO_LOAD_EVENTS + 12)
        assert len(events) == DEMO_LOAD_EVENTS + 12
        for headers, body in receiver.received:
            assert signed_by(headers, body, SECRET)
            assert msgspec.json.decode(body)["id"] == headers["webhook-id"]
        assert len({e["id"] for e in events}) == DEMO_LOAD_EVENTS + 12
        # (Delivered concurrently across accounts: the load's are picked out by type.)
        load_types = {"account.created", "account.funded", "card.created", "controls.updated"}
        loaded = sorted((e["type"], e["data"]["reason"]) for e in events if e["type"] in load_types)
        assert loaded == [
            *[("account.created", "load_account")] * 4,
            *[("account.funded", "load_fund")] * 4,
            *[("card.created", "load_card")] * 20,
            ("controls.updated", "programme_controls"),
        ]
        assert {e["type"] for e in events if e["type"] not in load_types} == {
            "authorization.approved",
            "authorization.declined",
        }
        sequences = [
            e["account_sequence"] for e in events if e["data"].get("account_id") == "demo-main"
        ]
        assert sequences == sorted(sequences) == list(range(1, len(sequences) + 1))
        assert "4761739001010085" not in str(events)
    finally:
        daemon.stop()
        receiver.close()


def test_a_load_into_the_running_daemons_ledger_reaches_the_programme(tmp_path: Path) -> None:
    """`processor ledger load` from another process: its balance changes are entries with
    events (issue 12, point 7), delivered like the daemon's own (the dispatcher polls)."""
    from harness import run_cli

    receiver = Receiver()
    types = 'event_types = ["account.funded", "account.debited", "card.status_changed"]\n'
    daemon = start(tmp_path, endpoint("main", receiver.url, types))
    try:
        receiver.wait_for(4)  # the demo data's four fundings at start
        changed = tmp_path / "changed.toml"
        changed.write_text(
            '[[accounts]]\nid = "demo-main"\ncurrency = "EUR"\nbalance = 99999999000\n\n'
            '[[cards]]\npan = "4761739001010085"\naccount = "demo-main"\nexpiry = "3012"\n'
            'status = "frozen"\n'
        )
        env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY)
        loaded = run_cli("ledger", "load", "--ledger", str(daemon.ledger), str(changed), env=env)
        assert loaded.returncode == 0, loaded.stderr
        events = receiver.wait_for(6, timeout=10)[4:]
        assert [(e["type"], e["data"]["reason"]) for e in events] == [
            ("account.debited", "load_debit"),
            ("card.status_changed", "card_frozen"),
        ]
        debited = events[0]["data"]
        assert debited["amount"]["amount"] == 100_000_000_000 - 99_999_999_000
        assert debited["balance_after"]["posted"]["amount"] == 99_999_999_000
        assert debited["entry"] == 2  # the account's second entry: its funding was the first
        assert events[1]["data"]["masked_pan"] == "476173******0085"
        link = daemon.connect()
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "62"
        link.close()
    finally:
        daemon.stop()
        receiver.close()


def test_failing_receiver_gets_everything_after_retries_same_ids(tmp_path: Path) -> None:
    receiver = Receiver(fail_first=5)
    daemon = start(tmp_path, endpoint("flaky", receiver.url))
    try:
        link = daemon.connect()
        for _ in range(4):
            assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        events = receiver.wait_for(4)
        assert len(events) == 4 and receiver.calls >= 9
        sequences = [e["account_sequence"] for e in events]
        assert sequences == sorted(sequences)
    finally:
        daemon.stop()
        receiver.close()


def test_a_dead_endpoint_does_not_hold_back_another_and_dead_letters(tmp_path: Path) -> None:
    good = Receiver()
    dead_url = "http://127.0.0.1:9/hook"  # nothing listens on the discard port
    daemon = start(
        tmp_path,
        endpoint("good", good.url)
        + endpoint("dead", dead_url, "retry_max_age_seconds = 1\ntimeout_seconds = 0.5\n"),
    )
    try:
        link = daemon.connect()
        started = time.monotonic()
        for _ in range(3):
            assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        assert len(good.wait_for(3, timeout=5)) == 3
        assert time.monotonic() - started < 5
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            state = DeliveryState(daemon.ledger / "webhooks", readonly=True)
            try:
                letters = state.dead_letters("dead")
            finally:
                state.close()
            if len(letters) == 3:
                break
            time.sleep(0.2)
        first = DEMO_LOAD_EVENTS + 1
        assert [letter.sequence for letter in letters] == [first, first + 1, first + 2]
        assert all(letter.last_error for letter in letters)
    finally:
        daemon.stop()
        good.close()


def test_event_type_filter(tmp_path: Path) -> None:
    receiver = Receiver()
    daemon = start(
        tmp_path, endpoint("declines", receiver.url, 'event_types = ["authorization.declined"]\n')
    )
    try:
        link = daemon.connect()
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        assert link.exchange(authorization(pan="4761739001010028", amount=100))["39"] == "41"
        link.close()
        receiver.wait_for(1)
        time.sleep(0.5)
        assert [e["type"] for e in receiver.events()] == ["authorization.declined"]
    finally:
        daemon.stop()
        receiver.close()


def test_missing_secret_fails_at_start_naming_the_variable(tmp_path: Path) -> None:
    from harness import run_serve

    config = tmp_path / "processor.toml"
    config.write_text(
        endpoint("main", "http://127.0.0.1:9/", "").replace("HOOK_SECRET", "NOPE_SECRET")
    )
    result = run_serve(tmp_path / "l", "--config", str(config), "--demo")
    assert result.returncode == 2
    assert (
        "$.webhooks.endpoints[0].secret_envs[0]: environment variable NOPE_SECRET is not set"
        in (result.stderr)
    )


def test_two_secrets_two_signatures_each_verifiable(tmp_path: Path) -> None:
    receiver = Receiver()
    daemon = start(
        tmp_path,
        endpoint("main", receiver.url, secret_envs='["HOOK_SECRET", "HOOK_SECRET_NEXT"]'),
    )
    try:
        link = daemon.connect()
        for _ in range(2):
            assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        assert len(receiver.wait_for(2)) == 2
        other = "whsec_" + base64.b64encode(b"x" * 32).decode()
        for headers, body in receiver.received:
            assert len(headers["webhook-signature"].split(" ")) == 2
            assert signed_by(headers, body, SECRET, SECRET_NEXT)  # both, in the order configured
            assert not signed_by(headers, body, other, SECRET_NEXT)
            # A receiver on either secret alone finds its signature among those offered.
            offered = headers["webhook-signature"].split(" ")
            for secret in (SECRET, SECRET_NEXT):
                moment = datetime.fromtimestamp(int(headers["webhook-timestamp"]), UTC)
                assert Webhook(secret).sign(headers["webhook-id"], moment, body.decode()) in offered
    finally:
        daemon.stop()
        receiver.close()


def test_a_second_secret_that_is_too_short_stops_the_start_naming_it(tmp_path: Path) -> None:
    from harness import run_serve

    config = tmp_path / "processor.toml"
    config.write_text(
        endpoint("main", "http://127.0.0.1:9/", secret_envs='["HOOK_SECRET", "HOOK_SHORT"]')
    )
    short = "whsec_" + base64.b64encode(b"s" * 16).decode()
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK_SECRET=SECRET, HOOK_SHORT=short)
    result = run_serve(tmp_path / "l", "--config", str(config), "--demo", env=env)
    assert result.returncode == 2
    assert (
        "$.webhooks.endpoints[0].secret_envs[1] (HOOK_SHORT): signing secret of 16 bytes, "
        "at least 24 needed" in result.stderr
    )
    assert short not in result.stderr and short[len("whsec_") :] not in result.stderr


def test_backlog_metrics_while_an_endpoint_is_down(tmp_path: Path) -> None:
    import urllib.request

    daemon = start(tmp_path, endpoint("down", "http://127.0.0.1:9/hook", "timeout_seconds = 0.5\n"))
    try:
        link = daemon.connect()
        for _ in range(3):
            assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        # The delivery process reports its metrics every 0.25 s: read until the oldest
        # undelivered event is reported a second old (bounded).
        url = f"http://127.0.0.1:{daemon.http_port}/metrics"
        deadline = time.monotonic() + 10
        values: dict[str, float] = {}
        oldest = 'processor_outbox_oldest_undelivered_seconds{endpoint="down"}'
        while time.monotonic() < deadline and values.get(oldest, 0.0) < 1.0:
            time.sleep(0.1)
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
            values = {
                line.split(" ")[0]: float(line.split(" ")[1])
                for line in text.splitlines()
                if line.startswith("processor_outbox_")
            }
        assert values['processor_outbox_backlog{endpoint="down"}'] == 3
        assert values['processor_outbox_oldest_undelivered_seconds{endpoint="down"}'] >= 1.0
        assert 'processor_webhook_failures_total{endpoint="down"' in text
    finally:
        daemon.stop()


def test_status_shows_dead_letters_and_replay_delivers_them(tmp_path: Path) -> None:
    from harness import run_cli

    receiver = Receiver()
    # The endpoint is down (nothing on its port) until we point a receiver there: use a
    # receiver that fails everything first, with a short retry age, then recovers.
    receiver.fail_first = 10**6
    config_endpoint = endpoint(
        "main", receiver.url, "retry_max_age_seconds = 1\ntimeout_seconds = 0.5\n"
    )
    daemon = start(tmp_path, config_endpoint)
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK_SECRET=SECRET)
    config_args = ["--config", str(tmp_path / "processor.toml"), "--ledger", str(daemon.ledger)]
    try:
        link = daemon.connect()
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        deadline = time.monotonic() + 20
        shown = ""
        # The dead letter and the position past it are two writes: the position at most every
        # POSITION_WRITE_SECONDS, so a status between them shows the one without the other.
        delivered = f"endpoint main: delivered up to {DEMO_LOAD_EVENTS + 1}, backlog 0"
        while time.monotonic() < deadline:
            shown = run_cli("webhooks", "status", *config_args, env=env).stdout
            if "dead letters 1" in shown and delivered in shown:
                break
            time.sleep(0.3)
        assert delivered in shown, shown
        assert "dead letters 1" in shown
        dead_id = shown.split("  dead ")[1].split(" ")[0]
        assert receiver.received == []

        receiver.fail_first = 0  # the receiver is back
        replayed = run_cli(
            "webhooks", "replay", *config_args, "--endpoint", "main", "--event", dead_id, env=env
        )
        assert replayed.returncode == 0, replayed.stderr
        events = receiver.wait_for(1, timeout=10)
        assert [e["id"] for e in events] == [dead_id]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            shown = run_cli("webhooks", "status", *config_args, env=env).stdout
            if "dead letters 0" in shown:
                break
            time.sleep(0.2)
        assert "dead letters 0" in shown
        # Replay from a sequence: everything from it again, same ids.
        again = run_cli(
            "webhooks", "replay", *config_args, "--endpoint", "main", "--from", "1", env=env
        )
        assert again.returncode == 0
        assert [e["id"] for e in receiver.wait_for(2, timeout=10)] == [dead_id, dead_id]
    finally:
        daemon.stop()
        receiver.close()


def test_listen_verifies_signatures_and_prints_events(tmp_path: Path) -> None:
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from processor.webhooks.signing import headers, parse_secret

    env = dict(os.environ, HOOK_SECRET=SECRET, HOOK_SECRET_NEXT=SECRET_NEXT)
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "processor.cli",
            "webhooks",
            "listen",
            "--port",
            "0",
            "--secret-env",
            "HOOK_SECRET",
            "--secret-env",
            "HOOK_SECRET_NEXT",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert listener.stdout is not None
        line = listener.stdout.readline()
        port = int(line.split("listening on 127.0.0.1:")[1].split(",")[0])
        assert line.rstrip().endswith("verifying with HOOK_SECRET or HOOK_SECRET_NEXT")
        body = b'{"id":"evt_x","type":"authorization.approved"}'
        # The listener is a real receiver: it keeps the replay window on its own clock, so
        # this one request is signed at the shared clock's time (nothing asserts on time).
        signed = headers([parse_secret(SECRET, "t")], "evt_x", int(time.time()), body)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=signed)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204
        assert '"evt_x"' in listener.stdout.readline()
        # Signed with the second secret alone (the sender has rotated): accepted too.
        rotated = headers([parse_secret(SECRET_NEXT, "t")], "evt_y", int(time.time()), body)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=rotated)
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204
        assert '"evt_x"' in listener.stdout.readline()  # the body printed again
        forged = dict(signed, **{"webhook-signature": "v1,AAAA"})
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=forged)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(bad, timeout=10)
        assert caught.value.code == 400
        caught.value.close()
        assert "REJECTED evt_x" in listener.stdout.readline()
    finally:
        listener.terminate()
        listener.communicate(timeout=10)


def test_kill9_with_a_receiver_attached_every_answered_request_arrives(tmp_path: Path) -> None:
    receiver = Receiver(delay_seconds=0.01)  # slow enough that a backlog is pending at the kill
    daemon = start(tmp_path, endpoint("main", receiver.url))
    try:
        link = daemon.connect()
        requests = [
            authorization(pan="4761739001010085" if n % 4 else "4761739001010028", amount=100)
            for n in range(40)
        ]
        for request in requests:
            link.send_fields(request)
        answered = {}
        for _ in requests:
            response = link.receive_fields()
            answered[response["11"]] = response["39"]
        daemon.kill9()
        link.close()
        assert set(answered.values()) == {"00", "41"}

        restarted = RunningDaemon(daemon.ledger, config=daemon.config, env=daemon.env).start()
        try:
            # At least once: redeliveries after the restart count too, so wait for coverage.
            _, by_stan = events_covering(receiver, set(answered), time.monotonic() + 30)
            assert set(by_stan) == set(answered)  # every answered request has its event
            assert all(len(ids) == 1 for ids in by_stan.values())  # duplicates share the id
        finally:
            restarted.stop()
    finally:
        daemon.stop()
        receiver.close()


def test_a_receiver_that_times_out_gets_every_event_after_retries(tmp_path: Path) -> None:
    receiver = Receiver(delay_seconds=1.0, slow_first=2)  # first two requests hang past timeout
    daemon = start(tmp_path, endpoint("slow", receiver.url, "timeout_seconds = 0.3\n"))
    try:
        link = daemon.connect()
        for _ in range(3):
            assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        events = receiver.wait_for(3, timeout=20)
        assert len({e["id"] for e in events}) == 3
        # demo-main's first events were the demo data's load's
        assert [e["account_sequence"] for e in events] == [9, 10, 11]
        assert receiver.calls >= 5
    finally:
        daemon.stop()
        receiver.close()


def test_redirects_are_not_followed_but_retried_and_logged(tmp_path: Path) -> None:
    receiver = Receiver()
    moved = receiver.url_for("/moved?token=s3cr3t")
    receiver.answers = [(302, {"Location": moved}), (307, {"Location": moved})]
    daemon = start(tmp_path, endpoint("main", receiver.url))
    try:
        link = daemon.connect()
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        (event,) = receiver.wait_for(1)
        attempts = receiver.wait_for_attempts(3)
        # Three POSTs to the configured path: two redirected, one delivered; /moved never asked.
        assert [(a.method, a.path, a.status) for a in attempts] == [
            ("POST", "/hook", 302),
            ("POST", "/hook", 307),
            ("POST", "/hook", 204),
        ]
        assert {a.headers["webhook-id"] for a in attempts} == {event["id"]}
        logged = [line for line in daemon.stderr().splitlines() if "a redirect to" in line]
        assert len(logged) == 2, daemon.stderr()
        assert "answered 302, a redirect to http://127.0.0.1:" in logged[0]
        assert "answered 307" in logged[1] and "not followed" in logged[1]
        assert "s3cr3t" not in daemon.stderr()
    finally:
        daemon.stop()
        receiver.close()


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(tmp_path: Path, status: int) -> None:
    receiver = Receiver(answers=[(status, {"Retry-After": "1"})])
    # The back-off alone would retry after 0.025 to 0.05 s; Retry-After asks for 1 s.
    daemon = start(tmp_path, endpoint("main", receiver.url), backoff_max_seconds=5.0)
    try:
        link = daemon.connect()
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        assert len(receiver.wait_for(1, timeout=10)) == 1
        first, second = receiver.wait_for_attempts(2)
        assert (first.status, second.status) == (status, 204)
        assert first.headers["webhook-id"] == second.headers["webhook-id"]
        # Arrival times at the receiver: the first is stamped before it is answered, so the
        # daemon's wait of at least 1 s lies wholly between the two.
        assert second.arrived - first.arrived >= 1.0
        assert second.arrived - first.arrived < 5.0  # not parked beyond the cap either
    finally:
        daemon.stop()
        receiver.close()


def test_410_disables_the_endpoint_across_a_restart_until_enabled(tmp_path: Path) -> None:
    import urllib.request

    from harness import run_cli

    receiver = Receiver(answers=[(410, {})])
    daemon = start(tmp_path, endpoint("main", receiver.url))
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK_SECRET=SECRET)
    config_args = ["--config", str(tmp_path / "processor.toml"), "--ledger", str(daemon.ledger)]
    try:
        link = daemon.connect()
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        (gone,) = receiver.wait_for_attempts(1)
        assert gone.status == 410
        deadline = time.monotonic() + 10
        shown = ""
        while time.monotonic() < deadline and "disabled since" not in shown:
            shown = run_cli("webhooks", "status", *config_args, env=env).stdout
            time.sleep(0.1)
        lines = shown.splitlines()
        at = lines.index(next(line for line in lines if line.startswith("endpoint main:")))
        assert lines[at + 1].startswith("  disabled since 20"), shown
        assert lines[at + 1].endswith(
            f"Z: http_410 answering {gone.headers['webhook-id']}; nothing is delivered to it "
            "until `processor webhooks enable main`"
        ), shown
        # The delivery process reports its metrics every 0.25 s: the gauge follows shortly.
        url = f"http://127.0.0.1:{daemon.http_port}/metrics"
        metrics = ""
        while time.monotonic() < deadline + 5:
            with urllib.request.urlopen(url, timeout=10) as response:
                metrics = response.read().decode()
            if 'processor_webhook_endpoint_disabled{endpoint="main"} 1.0' in metrics:
                break
            time.sleep(0.05)
        assert 'processor_webhook_endpoint_disabled{endpoint="main"} 1.0' in metrics
        # More events while disabled: nothing goes out (the daemon polls its state each second).
        for _ in range(2):
            assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        time.sleep(1.5)
        assert len(receiver.attempts) == 1

        # Persisted: a restarted daemon still delivers nothing to it.
        daemon.stop()
        daemon = RunningDaemon(daemon.ledger, config=daemon.config, env=daemon.env).start()
        assert any("(disabled after a 410 Gone: main)" in line for line in daemon.stdout)
        time.sleep(1.5)
        assert len(receiver.attempts) == 1

        enabled = run_cli("webhooks", "enable", "main", *config_args, env=env)
        assert enabled.returncode == 0, enabled.stderr
        assert enabled.stdout.startswith("endpoint main enabled (disabled since 20")
        assert enabled.stdout.endswith(
            f"http_410 answering {gone.headers['webhook-id']}); "
            f"delivery resumes from sequence {DEMO_LOAD_EVENTS + 1}\n"
        )
        events = receiver.wait_for(3, timeout=15)
        assert [e["account_sequence"] for e in events] == [9, 10, 11]  # after the load's eight
        assert events[0]["id"] == gone.headers["webhook-id"]  # the event answered 410, first
        shown = run_cli("webhooks", "status", *config_args, env=env).stdout
        delivered = f"endpoint main: delivered up to {DEMO_LOAD_EVENTS + 3}, backlog 0"
        assert "disabled" not in shown and delivered in shown
        again = run_cli("webhooks", "enable", "main", *config_args, env=env)
        assert again.stdout == "endpoint main is not disabled; nothing to do\n"
    finally:
        daemon.stop()
        receiver.close()


def test_delivery_runs_in_a_process_of_its_own_and_resumes_after_a_kill9(
    tmp_path: Path,
) -> None:
    import re
    import signal
    import urllib.request

    receiver = Receiver(delay_seconds=0.01)  # a backlog is pending when the process dies
    daemon = start(tmp_path, endpoint("main", receiver.url))
    try:
        [line] = [line for line in daemon.stdout if "webhooks: 1 endpoint(s)" in line]
        match = re.search(r"\(delivery process (\d+)\)", line)
        assert match is not None, line
        delivery_pid = int(match.group(1))
        assert delivery_pid != daemon.process.pid  # type: ignore[union-attr]
        link = daemon.connect()
        stans = []
        for n in range(60):
            response = link.exchange(authorization(pan="4761739001010085", amount=100))
            assert response["39"] == "00"
            stans.append(response["11"])
            if n == 30:
                os.kill(delivery_pid, signal.SIGKILL)  # the delivery process alone
        # Authorisations go on meanwhile (above), and the daemon starts delivery again.
        deadline = time.monotonic() + 30
        while "restarting it" not in daemon.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "webhook delivery process exited (code -9); restarting it" in daemon.stderr()
        events, by_stan = events_covering(receiver, set(stans), deadline)
        assert set(by_stan) == set(stans)  # nothing lost
        assert all(len(ids) == 1 for ids in by_stan.values())  # a repeat is the same event
        # Per-account order of first arrivals holds across the restart.
        first_seen: list[int] = []
        for event in events:
            if event["account_sequence"] not in first_seen:
                first_seen.append(event["account_sequence"])
        assert first_seen == sorted(first_seen)
        assert link.exchange(authorization(pan="4761739001010085", amount=100))["39"] == "00"
        link.close()
        url = f"http://127.0.0.1:{daemon.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            metrics = response.read().decode()
        assert 'processor_child_process_up{process="webhook-delivery"} 1.0' in metrics
    finally:
        daemon.stop()
        receiver.close()


def test_the_daemon_and_delivery_run_on_the_cpus_configured(tmp_path: Path) -> None:
    """server.cpus pins the daemon (and what it starts), webhooks.delivery_cpus the delivery
    process: on a machine of several cores, each on its own; events still arrive."""
    import re

    available = sorted(os.sched_getaffinity(0))
    daemon_cpu, delivery_cpu = available[0], available[-1]  # one core: both on it
    receiver = Receiver()
    config = tmp_path / "processor.toml"
    config.write_text(
        f"[server]\ncpus = [{daemon_cpu}]\n"
        f"[webhooks]\nbackoff_initial_seconds = 0.05\ndelivery_cpus = [{delivery_cpu}]\n"
        + endpoint("main", receiver.url)
    )
    environment = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, HOOK_SECRET=SECRET)
    daemon = RunningDaemon(tmp_path / "ledger", config=config, env=environment).start()
    try:
        [line] = [line for line in daemon.stdout if "webhooks: 1 endpoint(s)" in line]
        match = re.search(r"\(delivery process (\d+)\)", line)
        assert match is not None, line
        assert os.sched_getaffinity(daemon.process.pid) == {daemon_cpu}  # type: ignore[union-attr]
        assert os.sched_getaffinity(int(match.group(1))) == {delivery_cpu}
        link = daemon.connect()
        stan = link.exchange(authorization(pan="4761739001010085", amount=100))["11"]
        link.close()
        _, by_stan = events_covering(receiver, {stan}, time.monotonic() + 30)
        assert set(by_stan) == {stan}
    finally:
        daemon.stop()
        receiver.close()
