"""The dispatcher's retry policy on logical time, against a scripted HTTP receiver on 127.0.0.1.

The receiver is a real aiohttp server (the client must really see redirects, statuses and
headers); time is a `LogicalClock`, so back-off and waits are asserted as exact logical seconds,
never measured. Waits for the receiver are bounded by real time only to fail instead of hanging.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import lmdb
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from processor.config import WebhookEndpoint, WebhooksConfig
from processor.ledger.records import OutboxRecord
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.webhooks.dispatcher import (
    READ_BATCH,
    Dispatcher,
    Endpoint,
    Outcome,
    shown_location,
)
from processor.webhooks.state import DeliveryState, Disabled

SECRET = b"0123456789abcdef0123456789abcdef"
SECRET_NEXT = b"fedcba9876543210fedcba9876543210"
T0 = 1_795_486_000.0  # 2026-11-24: every test starts its logical clock here
WAIT_SECONDS_MAX = 10.0  # real time: a receiver that never sees what we wait for fails the test


class LogicalClock:
    """Time that passes only when the code under test sleeps: each sleep ends at once, with
    the clock moved to the sleep's end (never backwards), and is recorded."""

    def __init__(self, start: float = T0) -> None:
        self.time = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.time = max(self.time, self.time + seconds)
        await asyncio.sleep(0)


class ManualClock:
    """Time that passes only when the test moves it: sleepers wait until `advance_to` passes
    their end. For tests of what happens while something else is still waiting."""

    def __init__(self, start: float = T0) -> None:
        self.time = start
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.time

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.time + seconds, future))
        await future

    def advance_to(self, moment: float) -> None:
        self.time = moment
        for end, future in list(self.sleepers):
            if end <= moment:
                self.sleepers.remove((end, future))
                if not future.done():
                    future.set_result(None)

    def waiting(self) -> int:
        return sum(1 for _, future in self.sleepers if not future.done())


class Request(msgspec.Struct):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Answer = tuple[int, dict[str, str]]


class ScriptedReceiver:
    """Answers each request with the next scripted (status, headers), then with `otherwise`."""

    def __init__(self, script: list[Answer], otherwise: Answer = (204, {})) -> None:
        self.script = list(script)
        self.otherwise = otherwise
        self.requests: list[Request] = []
        # When set, a request is recorded on arrival and answered only once the gate opens: a
        # receiver still working on what it was sent (only the `gated` sequences', if given).
        self.gate: asyncio.Event | None = None
        self.gated: set[int] | None = None
        # Per event sequence, answers given to it before the script's (popped in order).
        self.by_sequence: dict[int, list[Answer]] = {}
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")

    async def _answer(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Request(request.method, request.path, headers, body))
        sequence = int(headers["webhook-id"][-12:], 16) if "webhook-id" in headers else -1
        if self.gate is not None and (self.gated is None or sequence in self.gated):
            await self.gate.wait()
        if self.by_sequence.get(sequence):
            status, extra = self.by_sequence[sequence].pop(0)
        else:
            status, extra = self.script.pop(0) if self.script else self.otherwise
        return web.Response(status=status, headers=extra)

    def url(self, path: str = "/hook") -> str:
        return str(self.server.make_url(path))

    def timestamps(self) -> list[int]:
        return [int(r.headers["webhook-timestamp"]) for r in self.requests]


def endpoint_config(url: str, **overrides: object) -> WebhookEndpoint:
    fields: dict[str, object] = {"name": "main", "url": url, "secret_envs": ["UNUSED"]}
    fields.update(overrides)
    return msgspec.convert(fields, WebhookEndpoint)


def add_events(
    ledger: Ledger,
    accounts: list[str],
    created: float = T0,
    *,
    kind: str = "authorization.approved",
    before: int = 0,
) -> None:
    """An event of `kind` per account in `accounts`, numbered in its account after `before`."""
    with ledger.write() as writer:
        for number, account in enumerate(accounts):
            writer.append_event(
                OutboxRecord(
                    sequence=writer.next_event_sequence(),
                    type=kind,
                    created_ms=int(created * 1000),
                    account_id=account,
                    account_sequence=before + number + 1,
                )
            )


def first_record(ledger: Ledger) -> tuple[OutboxRecord, str]:
    with ledger.read() as reader:
        return reader.outbox(1, 1)[0], reader.ledger_id()


async def wait_until(condition: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS_MAX
    while not condition():
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.01)


class Harness(msgspec.Struct):
    ledger: Ledger
    state: DeliveryState
    dispatcher: Dispatcher
    receiver: ScriptedReceiver
    clock: LogicalClock | ManualClock
    metrics: Metrics


def run(
    tmp_path: Path,
    script: list[Answer],
    test: Callable[[Harness], Awaitable[None]],
    *,
    otherwise: Answer = (204, {}),
    accounts: tuple[str, ...] = ("acct-1",),
    secrets: tuple[bytes, ...] = (SECRET,),
    backoff_initial_seconds: float = 1.0,
    backoff_max_seconds: float = 300.0,
    clock: LogicalClock | ManualClock | None = None,
    dead_letter_seconds: int | None = None,
    **endpoint: object,
) -> None:
    """Run `test` with a dispatcher (not started unless the test starts it) and a receiver."""

    async def main() -> None:
        receiver = ScriptedReceiver(script, otherwise)
        await receiver.server.start_server()
        ledger = Ledger(tmp_path / "ledger", durability="process", map_size_bytes=64 << 20)
        state = DeliveryState(tmp_path / "ledger" / "webhooks")
        chosen = LogicalClock() if clock is None else clock
        metrics = Metrics()
        config = WebhooksConfig(
            backoff_initial_seconds=backoff_initial_seconds,
            backoff_max_seconds=backoff_max_seconds,
        )
        add_events(ledger, list(accounts))
        dispatcher = Dispatcher(
            ledger,
            state,
            [Endpoint(endpoint_config(receiver.url(), **endpoint), secrets)],
            config,
            metrics,
            clock=chosen,
            jitter=lambda: 1.0,  # the longest delay of the jitter range: exact logical times
            dead_letter_seconds=dead_letter_seconds,
        )
        try:
            await test(Harness(ledger, state, dispatcher, receiver, chosen, metrics))
        finally:
            await dispatcher.stop()
            await receiver.server.close()
            state.close()
            ledger.close()

    asyncio.run(main())


async def deliver_first(harness: Harness) -> Outcome:
    """Deliver event 1 alone, as the endpoint's task would."""
    await harness.dispatcher.open_session()
    record, ledger_id = first_record(harness.ledger)
    return await harness.dispatcher.deliver(harness.dispatcher.endpoints[0], record, ledger_id)


def test_failures_back_off_doubling_on_logical_time(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "delivered"
        assert harness.clock.sleeps == [1.0, 2.0, 4.0]
        # Each attempt is signed with the logical time it was made at.
        assert harness.receiver.timestamps() == [T0, T0 + 1, T0 + 3, T0 + 7]

    run(tmp_path, [(500, {}), (502, {}), (500, {})], test)


def test_the_back_off_stops_growing_at_its_maximum(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "delivered"
        assert harness.clock.sleeps == [1.0, 2.0, 4.0, 5.0, 5.0]

    run(tmp_path, [(500, {})] * 5, test, backoff_max_seconds=5.0)


def test_an_event_older_than_its_retry_age_is_a_dead_letter(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "dead_letter"
        # Attempts at +0, +1, +3, +7, +15: the fifth is the first at an age of 10 s or more.
        assert harness.receiver.timestamps() == [T0, T0 + 1, T0 + 3, T0 + 7, T0 + 15]
        (letter,) = harness.state.dead_letters("main")
        assert (letter.sequence, letter.attempts, letter.last_error) == (1, 5, "http_500")
        assert letter.dead_ms == int((T0 + 15) * 1000)

    run(tmp_path, [], test, otherwise=(500, {}), retry_max_age_seconds=10)


def test_a_dead_letter_is_forgotten_past_the_events_horizon(tmp_path: Path) -> None:
    """A dead letter held retention's floor for ever: one failed delivery kept every later
    event of the ledger, and a dead endpoint's thousands a second grew it without bound."""

    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "dead_letter"  # dead at T0 + 15
        assert harness.dispatcher.expire_dead_letters() == 0  # young: still replayable
        assert len(harness.state.dead_letters("main")) == 1
        assert isinstance(harness.clock, LogicalClock)
        harness.clock.time = T0 + 15 + 3600 + 1
        assert harness.dispatcher.expire_dead_letters() == 1
        assert harness.state.dead_letters("main") == []
        expired = harness.metrics.webhook_dead_letters_expired.labels("main")._value.get()
        assert expired == 1

    run(tmp_path, [], test, otherwise=(500, {}), retry_max_age_seconds=10, dead_letter_seconds=3600)


def test_expired_dead_letters_stop_holding_retention_s_floor(tmp_path: Path) -> None:
    from processor.webhooks.state import DeadLetter

    state = DeliveryState(tmp_path / "webhooks")
    try:
        state.advance("main", 10)
        for sequence, dead_ms in ((3, 1_000), (5, 9_000), (7, 2_000)):
            letter = DeadLetter(
                sequence=sequence,
                event_id=f"e{sequence}",
                attempts=1,
                last_error="x",
                dead_ms=dead_ms,
            )
            state.bury("main", letter)
        assert state.floor(["main"]) == 3
        # In sequence order, up to the first younger one: 7 waits behind 5 (its turn comes).
        assert state.expire_dead_letters("main", 5_000, 100) == 1
        assert state.floor(["main"]) == 5
        assert state.expire_dead_letters("main", 10_000, 1) == 1  # bounded per call
        assert [letter.sequence for letter in state.dead_letters("main")] == [7]
        assert state.expire_dead_letters("main", 10_000, 100) == 1
        assert state.floor(["main"]) == 10
    finally:
        state.close()


def test_every_secret_signs_every_attempt_at_its_own_timestamp(tmp_path: Path) -> None:
    from processor.webhooks.signing import sign

    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "delivered"
        first, second = harness.receiver.requests
        for request, timestamp in ((first, int(T0)), (second, int(T0) + 1)):
            event_id = request.headers["webhook-id"]
            offered = request.headers["webhook-signature"].split(" ")
            assert offered == [
                sign(SECRET, event_id, timestamp, request.body),
                sign(SECRET_NEXT, event_id, timestamp, request.body),
            ]
            assert all(len(base64.b64decode(s[3:])) == 32 for s in offered)  # v1,<HMAC-SHA256>

    run(tmp_path, [(500, {})], test, secrets=(SECRET, SECRET_NEXT))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_but_a_failed_attempt_retried(
    tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(harness: Harness) -> None:
        moved = harness.receiver.url("/moved") + "?token=s3cr3t#part"
        harness.receiver.script = [(status, {"Location": moved})]
        with caplog.at_level(logging.WARNING, logger="processor.webhooks"):
            assert await deliver_first(harness) == "delivered"
        # Both attempts went to the configured url, as POSTs; /moved was never asked for.
        assert [(r.method, r.path) for r in harness.receiver.requests] == [("POST", "/hook")] * 2
        assert harness.clock.sleeps == [1.0]  # retried after the usual back-off
        failures = harness.metrics.registry.get_sample_value(
            "processor_webhook_failures_total", {"endpoint": "main", "error": f"http_{status}"}
        )
        assert failures == 1.0
        (line,) = [r.getMessage() for r in caplog.records if "redirect" in r.getMessage()]
        assert f"answered {status}, a redirect to http://127.0.0.1:" in line
        assert "/moved: not followed, a failed attempt" in line
        assert "s3cr3t" not in line and "part" not in line

    run(tmp_path, [], test)


def test_a_redirect_answered_until_the_retry_age_is_a_dead_letter(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "dead_letter"
        assert {r.path for r in harness.receiver.requests} == {"/hook"}
        (letter,) = harness.state.dead_letters("main")
        assert letter.last_error == "http_302"

    run(tmp_path, [], test, otherwise=(302, {"Location": "/moved"}), retry_max_age_seconds=3)


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        (
            "https://user:pw@hooks.example:8443/new/path?key=1#x",
            "https://hooks.example:8443/new/path",
        ),
        ("/relative?x=1", "/relative"),
        (None, "(no Location)"),
        ("http://[::1", "(an unreadable Location)"),
        ("https://h.example/" + "a" * 500, "https://h.example/" + "a" * 182),
        # No "//": the user info sat in what urlsplit takes for the path, shown in clear.
        ("u:secret@h.example/x?k=1", "h.example/x"),
        ("http:u:secret@h.example/x", "h.example/x"),
    ],
)
def test_a_location_is_logged_without_what_may_be_a_credential(
    location: str | None, shown: str
) -> None:
    assert shown_location(location) == shown


def http_date(moment: float) -> str:
    return email.utils.formatdate(moment, usegmt=True)


@pytest.mark.parametrize(
    ("answer", "second_attempt"),
    [
        pytest.param((429, {"Retry-After": "30"}), T0 + 30, id="429-seconds"),
        pytest.param((503, {"Retry-After": "30"}), T0 + 30, id="503-seconds"),
        pytest.param((429, {"Retry-After": http_date(T0 + 45)}), T0 + 45, id="429-date"),
        pytest.param((503, {"Retry-After": http_date(T0 + 45)}), T0 + 45, id="503-date"),
        # Shorter than the back-off: the back-off (1 s) still applies.
        pytest.param((429, {"Retry-After": "0"}), T0 + 1, id="429-zero"),
        pytest.param((503, {"Retry-After": http_date(T0 - 60)}), T0 + 1, id="503-past-date"),
        # Longer than backoff_max_seconds (300): cut to it.
        pytest.param((429, {"Retry-After": "3600"}), T0 + 300, id="429-capped"),
        pytest.param((503, {"Retry-After": http_date(T0 + 86400)}), T0 + 300, id="503-capped"),
        # Unreadable: the usual back-off.
        pytest.param((429, {"Retry-After": "soon"}), T0 + 1, id="429-words"),
        pytest.param((503, {"Retry-After": "1.5"}), T0 + 1, id="503-fraction"),
        pytest.param((429, {}), T0 + 1, id="429-absent"),
        # Only 429 and 503 are read for it.
        pytest.param((500, {"Retry-After": "30"}), T0 + 1, id="500-ignored"),
    ],
)
def test_retry_after_sets_the_next_attempt(
    tmp_path: Path, answer: Answer, second_attempt: float
) -> None:
    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "delivered"
        assert harness.receiver.timestamps() == [T0, second_attempt]

    run(tmp_path, [answer], test)


def test_a_single_attempts_retry_after_still_pauses_the_endpoint(tmp_path: Path) -> None:
    """A replayed event gets one attempt and is buried when it fails: answered 429 with
    Retry-After, it was buried before the pause was noted, and the next event went out at
    once, into the receiver's rate limit."""

    async def test(harness: Harness) -> None:
        await harness.dispatcher.open_session()
        endpoint = harness.dispatcher.endpoints[0]
        with harness.ledger.read() as reader:
            first, second = reader.outbox(1, 2)
            ledger_id = reader.ledger_id()
        assert await harness.dispatcher.deliver(endpoint, first, ledger_id, once=True) == (
            "dead_letter"
        )
        assert await harness.dispatcher.deliver(endpoint, second, ledger_id) == "delivered"
        assert harness.receiver.timestamps() == [T0, T0 + 30]

    run(tmp_path, [(429, {"Retry-After": "30"})], test, accounts=("a", "b"))


def test_retry_after_logged_with_the_pause_or_as_unreadable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(harness: Harness) -> None:
        with caplog.at_level(logging.INFO, logger="processor.webhooks"):
            assert await deliver_first(harness) == "delivered"
        lines = [r.getMessage() for r in caplog.records if "Retry-After" in r.getMessage()]
        assert lines == [
            "endpoint main: answered 429 with Retry-After '30': no attempt for 30.0 s",
            "endpoint main: answered 503 with an unreadable Retry-After 'soon': the usual back-off",
            "endpoint main: answered 429 with Retry-After '999': no attempt for 300.0 s"
            " (the most webhooks.backoff_max_seconds allows)",
        ]

    script: list[Answer] = [
        (429, {"Retry-After": "30"}),
        (503, {"Retry-After": "soon"}),
        (429, {"Retry-After": "999"}),
    ]
    run(tmp_path, script, test)


def test_retry_after_pauses_every_event_of_the_endpoint(tmp_path: Path) -> None:
    """A 429 on one event holds back the others' attempts too: the receiver is overloaded."""
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        await harness.dispatcher.open_session()
        with harness.ledger.read() as reader:
            first, second = reader.outbox(1, 2)
            ledger_id = reader.ledger_id()
        endpoint = harness.dispatcher.endpoints[0]
        one = asyncio.create_task(harness.dispatcher.deliver(endpoint, first, ledger_id))
        await wait_until(lambda: clock.waiting() == 1)  # answered 429, backing off
        two = asyncio.create_task(harness.dispatcher.deliver(endpoint, second, ledger_id))
        await wait_until(lambda: clock.waiting() == 2)  # a fresh event waits as well
        assert len(harness.receiver.requests) == 1
        clock.advance_to(T0 + 59)  # the first one's back-off is over, the pause is not
        await wait_until(lambda: clock.waiting() == 2)
        assert len(harness.receiver.requests) == 1
        clock.advance_to(T0 + 60)
        assert await one == "delivered" and await two == "delivered"
        assert sorted(harness.receiver.timestamps()) == [T0, T0 + 60, T0 + 60]

    run(
        tmp_path,
        [(429, {"Retry-After": "60"})],
        test,
        clock=clock,
        accounts=("acct-1", "acct-2"),
    )


def disabled_gauge(harness: Harness) -> float | None:
    return harness.metrics.registry.get_sample_value(
        "processor_webhook_endpoint_disabled", {"endpoint": "main"}
    )


def test_410_disables_the_endpoint_and_records_why(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        assert await deliver_first(harness) == "disabled"
        (request,) = harness.receiver.requests  # no retry
        assert harness.clock.sleeps == []
        why = Disabled(
            since_ms=int(T0 * 1000), reason="http_410", event_id=request.headers["webhook-id"]
        )
        assert harness.state.disabled("main") == why
        assert harness.dispatcher.disabled == {"main": why}
        assert why.since == "2026-11-24T02:06:40Z"
        assert harness.state.dead_letters("main") == []  # not given up on: kept for later
        failures = harness.metrics.registry.get_sample_value(
            "processor_webhook_failures_total", {"endpoint": "main", "error": "http_410"}
        )
        assert failures == 1.0
        # Any later delivery to it stops before its first attempt.
        record, ledger_id = first_record(harness.ledger)
        endpoint = harness.dispatcher.endpoints[0]
        assert await harness.dispatcher.deliver(endpoint, record, ledger_id) == "disabled"
        assert len(harness.receiver.requests) == 1

    run(tmp_path, [(410, {})], test)


def test_a_disabled_endpoint_gets_nothing_until_enabled_then_resumes(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        await harness.dispatcher.start()
        await wait_until(lambda: harness.state.disabled("main") is not None)
        assert disabled_gauge(harness) == 1.0
        add_events(harness.ledger, ["acct-1"])  # committed while disabled
        harness.dispatcher.notify()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert len(harness.receiver.requests) == 1
        assert harness.state.position("main") == 1  # the event answered 410 is not passed
        gone = harness.receiver.requests[0].headers["webhook-id"]

        assert harness.state.enable("main") is not None  # what `webhooks enable` does
        await wait_until(lambda: harness.state.position("main") == 5)
        ids = [r.headers["webhook-id"] for r in harness.receiver.requests]
        assert len(ids) == 5 and ids[0] == ids[1] == gone  # the 410'd event first, again
        assert ids[1:] == sorted(ids[1:]) and len(set(ids[1:])) == 4  # then the rest, in order
        assert harness.dispatcher.disabled == {}
        assert disabled_gauge(harness) == 0.0

    run(tmp_path, [(410, {})], test, accounts=("acct-1", "acct-1", "acct-1"))


def test_a_410_abandons_the_endpoint_s_other_deliveries(tmp_path: Path) -> None:
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        await harness.dispatcher.start()
        # Two accounts, two deliveries at once: one is answered 500 (and backs off), one 410.
        await wait_until(lambda: harness.state.disabled("main") is not None)
        await wait_until(lambda: len(harness.receiver.requests) == 2)
        clock.advance_to(T0 + 1000)  # far past any back-off
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert len(harness.receiver.requests) == 2
        assert harness.state.position("main") == 1

        harness.state.enable("main")
        await wait_until(lambda: harness.state.position("main") == 3)
        assert len(harness.receiver.requests) == 4

    run(
        tmp_path,
        [(410, {}), (500, {})],
        test,
        clock=clock,
        accounts=("acct-1", "acct-2"),
    )


def test_a_replay_request_waits_while_the_endpoint_is_disabled(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        harness.state.advance("main", 2)  # event 1 delivered before
        harness.state.request_replay("main", 1, "one")
        await harness.dispatcher.start()
        await wait_until(lambda: harness.state.disabled("main") is not None)
        assert len(harness.receiver.requests) == 1
        assert harness.state.take_replays("main") == [(1, "one")]  # kept, not lost

    run(tmp_path, [(410, {})], test)


def test_an_endpoint_disabled_before_a_start_stays_disabled(tmp_path: Path) -> None:
    async def test(harness: Harness) -> None:
        why = Disabled(since_ms=1, reason="http_410", event_id="evt_x")
        harness.state.disable("main", why)
        # A second 410 (another event, later) keeps the first reason.
        assert harness.state.disable("main", Disabled(since_ms=2, reason="x", event_id="y")) == why
        await harness.dispatcher.start()
        assert harness.dispatcher.disabled == {"main": why}
        assert disabled_gauge(harness) == 1.0
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert harness.receiver.requests == []

    run(tmp_path, [], test)


def test_an_endpoint_reads_past_a_full_read_of_types_it_does_not_want(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No idle poll within the test: only reading on after a full read gets to the last event.
    monkeypatch.setattr("processor.webhooks.dispatcher.IDLE_POLL_SECONDS", 3600.0)
    unwanted = 3 * READ_BATCH + 1

    async def test(harness: Harness) -> None:
        add_events(harness.ledger, ["acct-1"], kind="authorization.reversed", before=unwanted)
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 1)
        assert (
            msgspec.json.decode(harness.receiver.requests[0].body)["type"]
            == "authorization.reversed"
        )
        await wait_until(lambda: harness.state.position("main") == unwanted + 2)

    run(tmp_path, [], test, accounts=("acct-1",) * unwanted, event_types=["authorization.reversed"])


# --- the position, errors and one account's retries (a review's findings) -------------------


def prune_outbox(ledger: Ledger, through: int) -> None:
    """What retention does to events 1..`through` once every endpoint is past them."""
    with ledger.write() as writer:
        for sequence in range(1, through + 1):
            writer.maintenance_delete("outbox", sequence.to_bytes(8, "big"))
        writer.note_pruned_events(through)


def event_sequences(receiver: ScriptedReceiver) -> list[int]:
    return [int(r.headers["webhook-id"][-12:], 16) for r in receiver.requests]  # its sequence


def test_a_new_endpoint_on_a_pruned_outbox_moves_its_position_past_the_pruned_events(
    tmp_path: Path,
) -> None:
    """Position 1 on an outbox that starts at 6: it moves on, so that retention, the backlog
    gauge and a restart all see the events delivered (it stayed at 1 for good)."""

    async def test(harness: Harness) -> None:
        prune_outbox(harness.ledger, 5)
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 5)
        await wait_until(lambda: harness.state.position("main") == 11)
        assert sorted(event_sequences(harness.receiver)) == [6, 7, 8, 9, 10]
        assert harness.state.floor(["main"]) == 11
        assert harness.dispatcher.backlog("main")[0] == 0

    run(tmp_path, [], test, accounts=tuple(f"a{n}" for n in range(10)))


def test_a_replay_from_before_the_pruned_events_delivers_what_is_left_and_moves_on(
    tmp_path: Path,
) -> None:
    async def test(harness: Harness) -> None:
        prune_outbox(harness.ledger, 5)
        harness.state.advance("main", 11)  # everything delivered
        harness.state.request_replay("main", 1, "from")  # `processor webhooks replay --from 1`
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 5)
        add_events(harness.ledger, ["new"])
        harness.dispatcher.notify()
        await wait_until(lambda: harness.state.position("main") == 12)
        assert sorted(event_sequences(harness.receiver)) == [6, 7, 8, 9, 10, 11]

    run(tmp_path, [], test, accounts=tuple(f"a{n}" for n in range(10)))


def test_a_delivery_that_raised_is_tried_again_not_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivering event 1 raises once: it is neither delivered nor a dead letter, so it is
    tried again after a back-off, and its account's event 2 waits behind it."""
    from processor.webhooks import dispatcher as dispatcher_module

    real = dispatcher_module.render
    failures = [ValueError("a passing fault")]

    def render(record: OutboxRecord, ledger_id: str) -> object:
        if record.sequence == 1 and failures:
            raise failures.pop()
        return real(record, ledger_id)

    monkeypatch.setattr(dispatcher_module, "render", render)
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        await harness.dispatcher.start()
        await wait_until(lambda: clock.waiting() == 1)  # the back-off before trying again
        await asyncio.sleep(0.2)
        assert harness.receiver.requests == []  # event 2 is behind event 1
        assert harness.state.position("main") == 1  # not passed over
        clock.advance_to(clock.time + 1.0)
        await wait_until(lambda: len(harness.receiver.requests) == 2)
        assert event_sequences(harness.receiver) == [1, 2]
        await wait_until(lambda: harness.state.position("main") == 3)

    run(tmp_path, [], test, accounts=("acct-1", "acct-1"), clock=clock)


def test_an_endpoint_whose_delivery_stops_on_an_error_says_so_and_fails_the_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An outbox value that does not decode stops the endpoint's task: logged as critical and
    `on_failure` called (the delivery process then exits and is restarted), not left silent."""

    async def test(harness: Harness) -> None:
        with harness.ledger.env.begin(write=True) as txn:
            txn.put((2).to_bytes(8, "big"), b"\xc1", db=harness.ledger._dbs["outbox"])
        failed: list[bool] = []
        harness.dispatcher.on_failure = lambda: failed.append(True)
        await harness.dispatcher.start()
        await wait_until(lambda: bool(failed))
        assert harness.dispatcher.failed is not None
        assert any(
            r.levelno == logging.CRITICAL and "delivery stopped" in r.getMessage()
            for r in caplog.records
        )

    run(tmp_path, [], test)


def test_one_account_s_retrying_event_does_not_hold_back_other_accounts(tmp_path: Path) -> None:
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        add_events(harness.ledger, ["hot"] * 250)  # its later events, held behind its first
        add_events(harness.ledger, [f"other-{n}" for n in range(10)])
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 11)
        assert sorted(event_sequences(harness.receiver)) == [1, *range(252, 262)]
        await wait_until(lambda: harness.dispatcher.backlog("main")[0] == 261)  # from 1 on
        assert harness.state.position("main") == 1  # hot's first event is not delivered yet
        clock.advance_to(clock.time + 1.0)  # its retry, answered 204: the rest of hot's follow
        await wait_until(lambda: len(harness.receiver.requests) == 262)
        hot = [s for s in event_sequences(harness.receiver) if s <= 251]
        assert hot == [1, *range(1, 252)]  # in order, after the retry
        await wait_until(lambda: harness.state.position("main") == 262)

    run(tmp_path, [(500, {})], test, clock=clock, accounts=("hot",))


def test_a_cardholders_events_keep_their_order_though_of_no_account(tmp_path: Path) -> None:
    """KYC events carry no account: keyed by the event alone, the newer status went out
    while the older one waited for its retry, and arrived after it."""
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        with harness.ledger.write() as writer:
            for status in ("kyc_review", "kyc_approved"):
                writer.append_event(
                    OutboxRecord(
                        sequence=writer.next_event_sequence(),
                        type="cardholder.kyc_updated",
                        created_ms=int(T0 * 1000),
                        cardholder_id="ch_1",
                        reason=status,
                    )
                )
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 1)  # the first: 500
        await asyncio.sleep(0.2)
        assert event_sequences(harness.receiver) == [1]  # the second waits behind it
        clock.advance_to(clock.time + 1.0)
        await wait_until(lambda: len(harness.receiver.requests) == 3)
        assert event_sequences(harness.receiver) == [1, 1, 2]

    run(tmp_path, [(500, {})], test, clock=clock, accounts=())


def test_a_replay_is_applied_while_an_event_backs_off(tmp_path: Path) -> None:
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        add_events(harness.ledger, ["b"])
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 2)  # a: 500, b: 204
        harness.state.request_replay("main", 2, "one")  # b again, please
        # Within an idle poll, not after a's retry (the clock stands still): a's, backing off,
        # is abandoned, and reading starts again from the position, a's: both are sent again,
        # b's as asked (past the position, it goes in its turn, not ahead of it).
        await wait_until(lambda: sorted(event_sequences(harness.receiver)[2:4]) == [1, 2])
        assert not harness.state.has_replays("main")

    run(tmp_path, [(500, {})], test, clock=clock, accounts=("a",))


def test_what_is_read_ahead_of_a_retrying_event_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory: an account's events held behind its retrying first are counted, and once
    AHEAD_MAX are, reading waits for it (a read takes READ_BATCH records at most, so that is
    the bound's slack): other accounts' events beyond are not read yet."""
    from processor.webhooks import dispatcher as dispatcher_module

    monkeypatch.setattr(dispatcher_module, "AHEAD_MAX", 20)
    clock = ManualClock()
    hot = READ_BATCH + 50

    async def test(harness: Harness) -> None:
        add_events(harness.ledger, ["hot"] * (hot - 1))  # 2..hot: held behind event 1
        add_events(harness.ledger, [f"other-{n}" for n in range(5)])  # past the first read
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 1)
        await asyncio.sleep(1.5)  # past an idle poll of the loop: nothing more read or sent
        assert event_sequences(harness.receiver) == [1]
        clock.advance_to(clock.time + 1.0)  # event 1 delivered: hot's others, then the rest
        await wait_until(lambda: len(harness.receiver.requests) == hot + 6)
        assert sorted(event_sequences(harness.receiver)[1:]) == list(range(1, hot + 6))

    run(tmp_path, [(500, {})], test, clock=clock, accounts=("hot",))


def test_a_replay_waits_for_a_request_at_the_receiver_so_an_account_never_has_two(
    tmp_path: Path,
) -> None:
    """Abandoning a request only closes our socket; the receiver may still be working on it.
    So a replay waits for it: no event of its account is sent again, nor its next, meanwhile."""

    async def test(harness: Harness) -> None:
        gate = harness.receiver.gate = asyncio.Event()
        await harness.dispatcher.start()
        await wait_until(lambda: sorted(event_sequences(harness.receiver)) == [1, 3])
        harness.state.request_replay("main", 3, "one")
        await asyncio.sleep(1.5)  # past the replay poll and an idle poll of the loop
        assert sorted(event_sequences(harness.receiver)) == [1, 3]  # a's event 1 still there
        gate.set()
        await wait_until(lambda: event_sequences(harness.receiver).count(3) >= 2)
        await wait_until(lambda: 2 in event_sequences(harness.receiver))
        assert not harness.state.has_replays("main")

    run(tmp_path, [], test, accounts=("a", "a", "b"))


def test_a_replay_found_while_a_request_is_at_the_receiver_loses_no_event_backing_off(
    tmp_path: Path,
) -> None:
    """The replay abandoned a's event 1 (backing off) and, while b's event 2 was still at the
    receiver, the position was worked out again without it: it moved past 1, was stored, and
    reading restarted there. Event 1 was never sent again nor dead-lettered, and a's event 3
    went out without it."""
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        receiver = harness.receiver
        receiver.by_sequence[1] = [(500, {})]  # a's first: backs off (the clock stands still)
        receiver.gate, receiver.gated = asyncio.Event(), {2}  # b's: slow at the receiver
        await harness.dispatcher.start()
        await wait_until(lambda: sorted(event_sequences(receiver)) == [1, 2])
        harness.state.request_replay("main", 2, "one")
        await asyncio.sleep(1.5)  # past the replay poll: found while 2 is at the receiver
        receiver.gate.set()
        await asyncio.sleep(1.5)
        clock.advance_to(clock.time + 3600)  # any back-off long over
        await wait_until(lambda: 3 in event_sequences(receiver))
        sent = event_sequences(receiver)
        assert sent.count(1) >= 2  # sent again
        last_one = len(sent) - 1 - sent[::-1].index(1)
        assert sent.index(3) > last_one  # and before a's next
        assert harness.state.dead_letters("main") == []

    run(tmp_path, [], test, clock=clock, accounts=("a", "b", "a"), in_flight_max=4)


def test_a_replay_of_an_event_not_delivered_yet_waits_for_its_turn(tmp_path: Path) -> None:
    """`replay --event` of a's second event while a's first backs off: it was sent at once,
    ahead of the first, and its failed attempt left a dead letter that stayed after the walk
    delivered it (listed for good, holding retention's floor)."""
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        receiver = harness.receiver
        receiver.by_sequence[1] = [(500, {})]
        receiver.by_sequence[2] = [(500, {})]
        await harness.dispatcher.start()
        await wait_until(lambda: event_sequences(receiver) == [1])
        harness.state.request_replay("main", 2, "one")
        await asyncio.sleep(1.5)  # past the replay poll: applied
        assert not harness.state.has_replays("main")
        # Time moves on until both are delivered: on a busy machine the replayed attempt of 2
        # (answered 500) may come only after a first move, and then waits out a back-off.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_SECONDS_MAX
        while harness.state.position("main") != 3:
            assert loop.time() < deadline, "not delivered in time"
            clock.advance_to(clock.time + 300)  # the longest back-off
            await asyncio.sleep(0.05)
        sent = event_sequences(receiver)
        assert sent.index(2) > sent.index(1, 1)  # 2 only after 1 was delivered
        assert harness.state.dead_letters("main") == []
        assert harness.state.floor(["main"]) == 3

    run(tmp_path, [], test, clock=clock, accounts=("a", "a"), in_flight_max=4)


def test_stop_returns_when_it_lands_as_a_replay_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() (SIGTERM, or a failed endpoint) cancelling the endpoint's task just as it finds
    a replay, with a request at the receiver: the cancellation is not swallowed on the way."""

    async def test(harness: Harness) -> None:
        harness.receiver.gate = asyncio.Event()  # never opened: the request stays there
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 1)
        stopping: list[asyncio.Task[None]] = []
        real = harness.state.has_replays

        def has_replays(name: str) -> bool:
            found = real(name)
            if found and not stopping:
                stopping.append(asyncio.ensure_future(harness.dispatcher.stop()))
            return found

        monkeypatch.setattr(harness.state, "has_replays", has_replays)
        harness.state.request_replay("main", 1, "one")
        await wait_until(lambda: bool(stopping))
        await asyncio.wait_for(stopping[0], 2)  # not after the request's own timeout
        assert all(task.done() for task in harness.dispatcher._tasks)

    run(tmp_path, [], test)


def test_an_event_whose_delivery_keeps_raising_becomes_a_dead_letter_at_its_retry_age(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rendering event 1 raises every time (a record this build cannot render, say): past its
    retry age it is a dead letter like any failing event, and its account's next goes on."""
    from processor.webhooks import dispatcher as dispatcher_module

    real = dispatcher_module.render

    def render(record: OutboxRecord, ledger_id: str) -> object:
        if record.sequence == 1:
            raise ValueError("cannot render")
        return real(record, ledger_id)

    monkeypatch.setattr(dispatcher_module, "render", render)

    async def test(harness: Harness) -> None:
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 1)
        assert event_sequences(harness.receiver) == [2]
        [letter] = harness.state.dead_letters("main")
        assert (letter.sequence, letter.last_error) == (1, "internal_error")
        await wait_until(lambda: harness.state.position("main") == 3)

    run(
        tmp_path,
        [],
        test,
        accounts=("acct-1", "acct-1"),
        retry_max_age_seconds=1,
        clock=ManualClock(T0 + 10),  # the events are 10 s old: past their retry age
    )


def test_replays_taken_when_the_process_stops_are_kept_for_its_next_start(
    tmp_path: Path,
) -> None:
    """stop() while a replayed event is at the receiver: the rewind stays stored, and the
    replay requests not yet done are there for the next start."""

    async def test(harness: Harness) -> None:
        harness.state.advance("main", 4)  # 1..3 delivered
        harness.state.request_replay("main", 2, "from")
        harness.state.request_replay("main", 3, "one")
        harness.receiver.gate = asyncio.Event()  # never opened: the replayed 3 stays there
        await harness.dispatcher.start()
        await wait_until(lambda: event_sequences(harness.receiver) == [3])
        await asyncio.wait_for(harness.dispatcher.stop(), 5)
        assert harness.state.position("main") == 2
        assert harness.state.take_replays("main") == [(3, "one")]

    run(tmp_path, [], test, accounts=("a", "b", "c"))


def test_a_replay_of_one_event_does_not_undo_a_rewind_from_it(tmp_path: Path) -> None:
    """Both were kept under endpoint + sequence: `replay --event` after `replay --from` of
    the same event overwrote the rewind, and the events after it were never replayed."""

    async def test(harness: Harness) -> None:
        harness.state.advance("main", 4)  # events 1..3 delivered
        harness.state.request_replay("main", 1, "from")
        harness.state.request_replay("main", 1, "one")
        await harness.dispatcher.start()
        await wait_until(lambda: sorted(event_sequences(harness.receiver)) == [1, 2, 3])

    run(tmp_path, [], test, accounts=("a", "b", "c"))


def test_a_dead_letter_delivered_by_a_rewind_is_no_longer_dead(tmp_path: Path) -> None:
    """Only a replay of one event forgot its dead letter: delivered by `replay --from`, it
    stayed listed as dead, and held retention's floor at it for good."""

    async def test(harness: Harness) -> None:
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.state.dead_letters("main")) == 1)
        await wait_until(lambda: harness.state.position("main") == 2)
        harness.receiver.otherwise = (204, {})
        harness.state.request_replay("main", 1, "from")
        await wait_until(lambda: harness.state.dead_letters("main") == [])
        assert harness.state.floor(["main"]) == 2

    run(tmp_path, [], test, otherwise=(500, {}), retry_max_age_seconds=10)


def test_a_replay_of_one_event_that_fails_is_a_dead_letter_not_a_wait(tmp_path: Path) -> None:
    """It ran in the endpoint's loop with the back-off of any failing event: every other
    account's events waited behind it, up to its retry age (a day by default)."""
    clock = ManualClock()

    async def test(harness: Harness) -> None:
        harness.state.advance("main", 2)  # event 1 (account a) delivered
        harness.state.request_replay("main", 1, "one")  # answered 500
        await harness.dispatcher.start()
        await wait_until(lambda: len(harness.receiver.requests) == 1)
        add_events(harness.ledger, ["b"])
        harness.dispatcher.notify()
        await wait_until(lambda: event_sequences(harness.receiver) == [1, 2])
        assert [letter.sequence for letter in harness.state.dead_letters("main")] == [1]

    run(tmp_path, [(500, {})], test, clock=clock, accounts=("a",))


def test_a_replay_of_one_event_of_a_type_the_endpoint_does_not_want_is_dropped(
    tmp_path: Path,
) -> None:
    """Before the endpoint's position it was sent, at or past it the walk dropped it: whether
    an unsubscribed event reached the receiver depended on where the endpoint was. Asked for
    before event_types changed (the replay command refuses it now), it is dropped either way."""

    async def test(harness: Harness) -> None:
        # 2, a type it wants: sent by the walk
        add_events(harness.ledger, ["a"], kind="authorization.reversed", before=1)
        harness.state.advance("main", 2)  # event 1 (a type it does not want) passed
        harness.state.request_replay("main", 1, "one")
        await harness.dispatcher.start()
        await wait_until(lambda: harness.state.position("main") == 3)
        assert event_sequences(harness.receiver) == [2]
        assert harness.state.dead_letters("main") == []

    run(tmp_path, [], test, accounts=("a",), event_types=["authorization.reversed"])


def test_an_event_replayed_alone_and_by_a_rewind_is_not_left_dead(tmp_path: Path) -> None:
    """`replay --from 1` and `replay --event 2` together: the one attempt at 2 failed and left
    a dead letter, which stayed listed after the rewind's walk delivered 2 (holding retention's
    floor at it for good)."""

    async def test(harness: Harness) -> None:
        harness.state.advance("main", 3)  # 1 and 2 delivered
        harness.state.request_replay("main", 1, "from")
        harness.state.request_replay("main", 2, "one")
        harness.receiver.by_sequence[2] = [(500, {})]  # the one attempt fails
        await harness.dispatcher.start()
        await wait_until(lambda: event_sequences(harness.receiver).count(2) == 2)
        await wait_until(lambda: harness.state.position("main") == 3)
        assert harness.state.dead_letters("main") == []

    run(tmp_path, [], test, accounts=("a", "b"))


def test_a_failing_dead_letter_expiry_does_not_stop_delivery(tmp_path: Path) -> None:
    """Housekeeping: a state it cannot write (a full map) is logged and tried again later,
    not the end of the delivery process (which then restarted into the same failure)."""

    async def test(harness: Harness) -> None:
        def full(endpoint: str, before_ms: int, limit: int) -> int:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")

        harness.state.expire_dead_letters = full  # type: ignore[method-assign]
        await harness.dispatcher.start()
        await wait_until(lambda: event_sequences(harness.receiver) == [1])
        assert harness.dispatcher.failed is None

    run(tmp_path, [], test, dead_letter_seconds=3600)
