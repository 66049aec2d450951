"""Deliver outbox events to the programme's endpoints: signed, retried, in order.

One task per endpoint walks the outbox from that endpoint's position. Each event is retried
with exponential back-off and jitter until a 2xx or until it is older than the endpoint's
`retry_max_age_seconds`, when it goes to the dead letters and the walk goes on. A 429 or 503
with Retry-After pauses the whole endpoint, not only that event (processor/webhooks/policy.py):
it is the receiver saying it is overloaded. A 410 Gone disables the endpoint (Standard
Webhooks): its task stops delivering, in flight attempts are abandoned, and the state records
it, so it stays disabled across restarts until `processor webhooks enable NAME`; delivery then
resumes from its stored position, the event answered 410 first. Events are delivered in outbox
order, so per-account order holds; a slow or dead endpoint holds back only its own task. Ledger
access is read transactions only; positions live in DeliveryState.

Time comes from a `Clock` and jitter from a callable, both passed in: the signing timestamp,
event ages, dead-letter times and back-off sleeps are all read from them, so tests run the
retry policy on logical time. Only the idle polls below wait on the event loop's own clock:
they bound how soon outside changes are noticed and decide nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

import msgspec
from prometheus_client import Counter, Histogram

from processor.config import WebhookEndpoint, WebhooksConfig
from processor.events import event_id, render
from processor.ledger.records import EventIds, OutboxRecord
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.webhooks.client import HttpClient, HttpError, parse_target
from processor.webhooks.policy import RETRY_AFTER_STATUSES, backoff_seconds, pause_seconds
from processor.webhooks.signing import endpoint_secrets, headers
from processor.webhooks.state import DeadLetter, DeliveryState, Disabled, backlog_at

log = logging.getLogger("processor.webhooks")

READ_BATCH = 100  # outbox records read per read transaction
# Events held (a sequence number each) behind their account's event in flight, at most (a read
# may take READ_BATCH more). An account whose event retries (up to retry_max_age_seconds) holds
# the stored position; other accounts' events go ahead until this many are held, then reading
# waits for it.
AHEAD_MAX = 100_000
# An endpoint's position is written at most this often, and at the latest this long after it
# moved: a write transaction per event was a tenth of the delivery process's time (at a few
# thousand events a second one at a time, each event left nothing running, and "write whenever
# none runs" wrote after every one). After a crash, what was delivered since is delivered
# again (at least once, as always).
POSITION_WRITE_SECONDS = 0.05
IDLE_POLL_SECONDS = 1.0  # also picks up events committed by other processes (clearing ingest)
# How often a busy endpoint looks for `processor webhooks replay` requests (a read of the
# delivery state; once per event was a measurable share of the process at 2,000 events/s).
REPLAY_POLL_SECONDS = 0.1
# Dead letters past their horizon are forgotten this often, at most this many an endpoint a
# pass (one write transaction each: bounded, however many a dead endpoint made).
DEAD_LETTER_EXPIRY_SECONDS = 60.0
DEAD_LETTER_EXPIRY_BATCH = 10_000


class Clock(Protocol):
    def now(self) -> float:
        """Unix time in seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The wall clock and the event loop's sleep: what the daemon runs on."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def uniform_jitter() -> float:
    """A factor for a back-off delay: spreads the retries of many events over time."""
    return random.uniform(0.5, 1.0)


# What became of one event at one endpoint: a 2xx, a dead letter after its retry age, or
# nothing because the endpoint was disabled (a 410) before it got through.
Outcome = Literal["delivered", "dead_letter", "disabled"]


async def _abandon(tasks: Iterable[asyncio.Task[Outcome]]) -> None:
    """Cancel deliveries and wait until they have stopped. asyncio.wait, not an await of each:
    their own errors and cancellations stay theirs, and a cancellation of the caller (stop())
    is not swallowed."""
    waited = list(tasks)
    for task in waited:
        task.cancel()
    if waited:
        await asyncio.wait(waited)


def _account_key(record: OutboxRecord) -> str:
    """What order is kept by: its account; for an event of none, its cardholder's (KYC
    changes), or else the one lane of the programme's (programme controls, messages about
    unknown cards). Keyed by the event alone, two KYC changes of one cardholder were in
    flight at once, and a retried older status could arrive after the newer."""
    if record.account_id:
        return record.account_id
    return f"cardholder:{record.cardholder_id}" if record.cardholder_id else "programme:"


class Endpoint(msgspec.Struct, frozen=True):
    config: WebhookEndpoint
    secrets: tuple[bytes, ...]  # one signature each, in the order of config.secret_envs

    def wants(self, event_type: str) -> bool:
        return self.config.wants(event_type)


def configured_endpoints(config: WebhooksConfig, environment: Mapping[str, str]) -> list[Endpoint]:
    """Each configured endpoint with its signing secrets from `environment`. A ValueError
    names the endpoint's key and what is wrong: a secret missing or unfit (SecretError), or a
    URL no POST can go to (an IDNA-unfit host, a port out of range)."""
    endpoints = []
    for index, each in enumerate(config.endpoints):
        where = f"$.webhooks.endpoints[{index}]"
        try:
            parse_target(each.url)
        except ValueError as error:
            raise ValueError(f"{where}.url: {error}") from None
        endpoints.append(Endpoint(each, endpoint_secrets(each, where, environment)))
    return endpoints


class Dispatcher:
    def __init__(
        self,
        ledger: Ledger,
        state: DeliveryState,
        endpoints: list[Endpoint],
        config: WebhooksConfig,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        jitter: Callable[[], float] = uniform_jitter,
        dead_letter_seconds: int | None = None,
    ) -> None:
        """`dead_letter_seconds`: how long a dead letter stays replayable (and holds its
        event from retention): the ledger's `retention.events_seconds`; None, for ever
        (retention switched off)."""
        self._ledger = ledger
        self._clock: Clock = SystemClock() if clock is None else clock
        self._jitter = jitter
        self._state = state
        self.endpoints = endpoints
        self._config = config
        self._metrics = metrics
        self._wakes = {endpoint.config.name: asyncio.Event() for endpoint in endpoints}
        # Per endpoint, the sequences with a request at the receiver now (not in a back-off).
        self._sending: dict[str, set[int]] = {endpoint.config.name: set() for endpoint in endpoints}
        self._tasks: list[asyncio.Task[None]] = []
        self._client: HttpClient | None = None
        self.state = state
        self._positions: dict[str, int] = {}
        # Per endpoint, dead letters a `replay --from` rewound over: each is forgotten once
        # delivered (kept, it stayed listed as dead and held retention's floor for good).
        self._rewound_dead: dict[str, set[int]] = {}
        # Per endpoint, the clock time before which no attempt starts (from Retry-After).
        self._paused_until: dict[str, float] = {}
        # Endpoints that answered 410, as in the state (which the CLI changes): read at start,
        # written here on a 410, dropped when the state no longer has them.
        self.disabled: dict[str, Disabled] = {}
        # Per endpoint, its delivered counter and latency histogram: `labels()` looks the
        # series up under a lock each time, a few microseconds per delivered event.
        self._delivered: dict[str, tuple[Counter, Histogram]] = {}
        # An endpoint's task that raised (a bug, an unreadable outbox record, a state write
        # that failed): delivery to it has stopped. Logged; then `on_failure`, with which the
        # delivery process exits so that its supervisor starts it again from the stored
        # positions (at least once, nothing skipped).
        self.failed: BaseException | None = None
        self.on_failure: Callable[[], None] | None = None
        self._dead_letter_seconds = dead_letter_seconds

    def notify(self) -> None:
        """New events were committed: wake the endpoint tasks."""
        for wake in self._wakes.values():
            wake.set()

    def backlog(self, name: str) -> tuple[int, float]:
        """(events not yet delivered, age in seconds of the oldest) for an endpoint."""
        with self._ledger.read() as reader:
            waiting, age = backlog_at(reader, self._positions.get(name, 1), self._clock.now())
        return int(waiting), age

    def _gauge(self, name: str, which: int) -> Callable[[], float]:
        return lambda: float(self.backlog(name)[which])

    def _disabled_gauge(self, name: str) -> Callable[[], float]:
        return lambda: 1.0 if name in self.disabled else 0.0

    async def start(self) -> None:
        for endpoint in self.endpoints:
            name = endpoint.config.name
            self._positions[name] = self.state.position(name)
            # Computed when scraped, from the ledger's outbox and the task's position.
            self._metrics.outbox_backlog.labels(name).set_function(self._gauge(name, 0))
            self._metrics.outbox_oldest_undelivered.labels(name).set_function(self._gauge(name, 1))
            self._metrics.webhook_endpoint_disabled.labels(name).set_function(
                self._disabled_gauge(name)
            )
            why = self.state.disabled(name)
            if why is not None:
                self.disabled[name] = why
                log.warning(
                    "endpoint %s: disabled since %s (%s answering %s); nothing is delivered to "
                    "it until `processor webhooks enable %s`",
                    name,
                    why.since,
                    why.reason,
                    why.event_id,
                    name,
                )
        await self.open_session()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(endpoint)) for endpoint in self.endpoints]
        for task, endpoint in zip(self._tasks, self.endpoints, strict=True):
            task.add_done_callback(self._stopped(endpoint.config.name))
        if self._dead_letter_seconds is not None and self.endpoints:
            expiry = loop.create_task(self._expire_dead_letters())
            expiry.add_done_callback(self._stopped("(dead-letter expiry)"))
            self._tasks.append(expiry)

    async def _expire_dead_letters(self) -> None:
        while True:
            try:
                self.expire_dead_letters()
            except Exception as error:  # housekeeping (a full state map, say): never delivery's end
                log.error("dead letters could not be expired: %r; trying again later", error)
            await self._clock.sleep(DEAD_LETTER_EXPIRY_SECONDS)

    def expire_dead_letters(self) -> int:
        """Forget each endpoint's dead letters older than `dead_letter_seconds` (logged and
        counted): past it their events may go, as every other event's do."""
        if self._dead_letter_seconds is None:
            return 0
        before_ms = int((self._clock.now() - self._dead_letter_seconds) * 1000)
        total = 0
        for endpoint in self.endpoints:
            name = endpoint.config.name
            expired = self._state.expire_dead_letters(name, before_ms, DEAD_LETTER_EXPIRY_BATCH)
            if expired:
                self._metrics.webhook_dead_letters_expired.labels(name).inc(expired)
                log.warning(
                    "endpoint %s: %d dead letters older than %d s forgotten (no longer "
                    "replayable; retention.events_seconds)",
                    name,
                    expired,
                    self._dead_letter_seconds,
                )
                total += expired
        return total

    def _stopped(self, name: str) -> Callable[[asyncio.Task[None]], None]:
        def stopped(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            failure = task.exception()
            log.critical(
                "endpoint %s: delivery stopped: %r; the delivery process exits, to be started "
                "again from the stored positions",
                name,
                failure,
                exc_info=failure,
            )
            if self.failed is None:
                self.failed = failure
                if self.on_failure is not None:
                    self.on_failure()

        return stopped

    async def open_session(self) -> None:
        """The HTTP client the deliveries share (`start` opens it; tests may open it alone)."""
        if self._client is None:
            self._client = HttpClient()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)  # one that raised was logged when it did (`_stopped`)
        for name, position in self._positions.items():
            if position != self.state.position(name):
                self.state.advance(name, position)  # what was delivered since the last write
        if self._client is not None:
            await self._client.close()

    async def _run(self, endpoint: Endpoint) -> None:
        """Deliver in outbox order with up to `in_flight_max` requests at once.

        Per-account order holds because an account never has two events started: a later
        event of an account whose event is in flight (or about to be) is held, as a sequence
        number, until that one finishes, then read again; events of other accounts go ahead
        while fewer than AHEAD_MAX are held. The stored position is the
        lowest sequence not yet finished (or, with none outstanding, the one after the last
        read: sequences retention pruned are passed over), so a restart redelivers (same ids)
        rather than skips.
        """
        name = endpoint.config.name
        wake = self._wakes[name]
        window = endpoint.config.in_flight_max
        position = self._state.position(name)
        read_up_to = position - 1
        # Whether the outbox may hold events past read_up_to: after a wake, a finished delivery
        # or an idle poll (worker processes and tools commit without waking us), or a full
        # read (more may follow at once; types the endpoint does not want are read past).
        unread = True
        replays_at = -REPLAY_POLL_SECONDS  # monotonic time replay requests were last looked for
        replay_due = False  # requests found, to apply once no request is at the receiver
        running: dict[asyncio.Task[Outcome], OutboxRecord] = {}
        ready: deque[OutboxRecord] = deque()  # read, their accounts' next, not started
        owners: set[str] = set()  # accounts with an event running or ready
        held: dict[str, deque[int]] = {}  # per account, later sequences read, in order
        held_count = 0
        raised: dict[int, int] = {}  # per sequence, delivery attempts that raised
        ids = EventIds([(1, "")])  # read with the events (a restored backup names its own)
        written, written_at = position, time.monotonic()  # the position last stored
        try:
            while True:
                unread = unread or wake.is_set()
                wake.clear()
                if not replay_due and time.monotonic() - replays_at >= REPLAY_POLL_SECONDS:
                    replays_at = time.monotonic()
                    replay_due = self._state.has_replays(name)
                if replay_due:
                    # Replays are applied now rather than after an event that may retry for hours:
                    # nothing new starts, deliveries waiting out a back-off are cancelled, and those
                    # with a request at the receiver are let finish it (cancelling one would only
                    # close our socket, and its event, sent again, could overlap with its account's
                    # next at the receiver).
                    sending = self._sending[name]
                    waiting_out = [task for task, r in running.items() if r.sequence not in sending]
                    await _abandon(waiting_out)
                    for task in waiting_out:
                        del running[task]
                if name in self.disabled or (replay_due and not running):
                    # Read again from the position: for a receiver that said Gone, nothing more
                    # goes to it (what is in flight is abandoned); for replays, after applying them.
                    # What is abandoned, and what finished past the position, is delivered again
                    # (at least once).
                    await _abandon(running)
                    running, ready, owners, held, held_count, raised = {}, deque(), set(), {}, 0, {}
                    read_up_to, unread = position - 1, True
                    if name in self.disabled:
                        await self._until_enabled(name, position)
                        continue
                    replay_due = False
                    rewound = await self._replay(endpoint, position)
                    if rewound < position:  # _replay stored it
                        position, read_up_to, written = rewound, rewound - 1, rewound
                    if name in self.disabled:
                        continue
                if unread and len(ready) < READ_BATCH and held_count < AHEAD_MAX:
                    with self._ledger.read() as reader:
                        ids = reader.event_ids()
                        fresh = reader.outbox(read_up_to + 1, READ_BATCH)
                    unread = len(fresh) == READ_BATCH
                    if fresh:
                        read_up_to = fresh[-1].sequence
                    for record in fresh:
                        if not endpoint.wants(record.type):
                            continue  # finished as read
                        key = _account_key(record)
                        if key in owners:
                            held.setdefault(key, deque()).append(record.sequence)
                            held_count += 1
                        else:
                            owners.add(key)
                            ready.append(record)
                while ready and len(running) < window and not replay_due:
                    record = ready.popleft()
                    task = asyncio.get_running_loop().create_task(
                        self.deliver(endpoint, record, ids.prefix(record.sequence))
                    )
                    running[task] = record
                if not replay_due:
                    # While a replay waits for a request at the receiver, the position stays:
                    # the deliveries it abandoned are no longer outstanding, and worked out
                    # without them it moved past them, reading restarted there, and they were
                    # never sent again (nor dead-lettered).
                    outstanding = [record.sequence for record in (*running.values(), *ready)]
                    outstanding.extend(sequences[0] for sequences in held.values())
                    position = min(outstanding, default=read_up_to + 1)
                self._positions[name] = position
                if position != written and time.monotonic() - written_at >= POSITION_WRITE_SECONDS:
                    self._state.advance(name, position)
                    written, written_at = position, time.monotonic()
                if running:
                    done, _ = await asyncio.wait(
                        running, timeout=IDLE_POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
                    )
                    # Read again after a finished delivery too: worker processes commit events
                    # without waking this process, and a pass that finds nothing new is cheap.
                    unread = True
                    for task in done:
                        record = running.pop(task)
                        outcome = self._outcome(task, name, record)
                        if outcome is None:
                            # It raised (logged): not delivered. Tried again after a back-off,
                            # its account's later events still behind it, until it is past its
                            # retry age like any failing event: then a dead letter.
                            tries = raised[record.sequence] = raised.get(record.sequence, 0) + 1
                            if not self._bury_raising(endpoint, record, ids, tries):
                                running[self._again(endpoint, record, ids, tries)] = record
                                continue
                        raised.pop(record.sequence, None)
                        if outcome == "disabled":
                            continue  # the next pass abandons everything
                        dead = self._rewound_dead.get(name)
                        if dead and outcome == "delivered" and record.sequence in dead:
                            dead.discard(record.sequence)
                            self._state.forget_dead_letter(name, record.sequence)
                        key = _account_key(record)
                        owners.discard(key)
                        later = held.get(key, deque())
                        while later and key not in owners:  # its account's next event, if any
                            found = self._record(later.popleft())
                            held_count -= 1
                            if found is not None:
                                owners.add(key)
                                ready.append(found)
                        if not later:
                            held.pop(key, None)
                elif not ready and not unread and not replay_due:
                    idle = IDLE_POLL_SECONDS
                    if position != written:  # wake up to write it when due
                        idle = max(0.0, written_at + POSITION_WRITE_SECONDS - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), idle)
                    unread = True  # woken, or an idle poll
                else:
                    # A full read of types this endpoint does not want: read on, but let the other
                    # endpoints, the wake pipe and the metrics reports have the loop in between.
                    await asyncio.sleep(0)
        finally:
            # Stopped (or failed): its deliveries must not go on behind the stored positions.
            for task in running:
                task.cancel()

    def _record(self, sequence: int) -> OutboxRecord | None:
        """The outbox record of a held sequence, read again. Retention keeps every event from
        the stored position on, which is at most this one, so it is there; if not (a ledger
        edited by hand), it is passed over, logged."""
        with self._ledger.read() as reader:
            records = reader.outbox(sequence, 1)
        if records and records[0].sequence == sequence:
            return records[0]
        log.error("outbox event %d is gone before it was delivered; passed over", sequence)
        return None

    def _bury_raising(
        self, endpoint: Endpoint, record: OutboxRecord, ids: EventIds, raised: int
    ) -> bool:
        """Whether an event whose delivery keeps raising is past its retry age and is now a
        dead letter (replayable, keeping retention behind it), rather than tried forever."""
        now = self._clock.now()
        if now - record.created_ms / 1000 < endpoint.config.retry_max_age_seconds:
            return False
        name = endpoint.config.name
        letter = DeadLetter(
            sequence=record.sequence,
            event_id=event_id(ids.prefix(record.sequence), record.sequence),
            attempts=raised,
            last_error="internal_error",
            dead_ms=int(now * 1000),
        )
        try:
            self._bury(name, letter)
        except Exception as error:  # the state full, say: tried again with the event
            log.error(
                "endpoint %s: %s could not be dead-lettered: %r", name, letter.event_id, error
            )
            return False
        return True

    def _bury(self, name: str, letter: DeadLetter) -> None:
        """Store a dead letter (replayable), then say so and count it."""
        self._state.bury(name, letter)
        log.warning(
            "endpoint %s: %s dead-lettered after %d attempts (%s)",
            name,
            letter.event_id,
            letter.attempts,
            letter.last_error,
        )
        self._metrics.webhook_dead_letters.labels(name).inc()

    def _again(
        self, endpoint: Endpoint, record: OutboxRecord, ids: EventIds, raised: int
    ) -> asyncio.Task[Outcome]:
        """Deliver `record` again, as a task, after the back-off of a failed attempt (its last
        `raised` tries raised: logged each, so the back-off also bounds the lines)."""
        delay = backoff_seconds(
            raised, self._config.backoff_initial_seconds, self._config.backoff_max_seconds, 1.0
        )

        async def later() -> Outcome:
            await self._clock.sleep(delay)
            return await self.deliver(endpoint, record, ids.prefix(record.sequence))

        return asyncio.get_running_loop().create_task(later())

    @staticmethod
    def _outcome(task: asyncio.Task[Outcome], name: str, record: OutboxRecord) -> Outcome | None:
        """A finished delivery's outcome; None, logged with its traceback, if it raised."""
        failure = task.exception()
        if failure is None:
            return task.result()
        log.error(
            "endpoint %s: delivering sequence %d failed: %r",
            name,
            record.sequence,
            failure,
            exc_info=failure,
        )
        return None

    async def _until_enabled(self, name: str, position: int) -> None:
        """Wait until `processor webhooks enable` has removed the endpoint's disabled mark."""
        while self.state.disabled(name) is not None:
            await asyncio.sleep(IDLE_POLL_SECONDS)
        del self.disabled[name]
        log.warning("endpoint %s: enabled again, delivering from sequence %d", name, position)

    async def _replay(self, endpoint: Endpoint, position: int) -> int:
        """Apply `processor webhooks replay` requests: rewind, or deliver single events again."""
        name = endpoint.config.name
        requests = self.state.take_replays(name)
        walked_from = position  # the loop reads (and so delivers) from here after the replays
        for index, (sequence, kind) in enumerate(requests):
            if name in self.disabled:  # a 410 meanwhile: the rest wait until it is enabled
                for kept in requests[index:]:
                    self.state.request_replay(name, *kept)
                break
            if kind == "from":
                self._rewound_dead.setdefault(name, set()).update(
                    letter.sequence
                    for letter in self.state.dead_letters(name)
                    if letter.sequence >= sequence
                )
                position = min(position, sequence)
                self.state.advance(name, position)
                self._positions[name] = position  # what stop() writes, if it comes meanwhile
                continue
            with self._ledger.read() as reader:
                ledger_id = reader.event_ids().prefix(sequence)
                records = reader.outbox(sequence, 1)
            found = records[0] if records and records[0].sequence == sequence else None
            if found is None:
                continue
            if not endpoint.wants(found.type):
                # The replay command refuses such a request; one made before event_types
                # changed is dropped as the walk drops the type (sent before the position
                # only, it was sent or not depending on where the endpoint was).
                log.warning(
                    "endpoint %s: replay of event %s dropped: its type %s is not in the "
                    "endpoint's event_types",
                    name,
                    event_id(ledger_id, sequence),
                    found.type,
                )
                continue
            if sequence >= walked_from and not self.state.is_dead_letter(name, sequence):
                # At or past the position: the walk after the replays sends it (again) in its
                # account's order. Sent now too, it reached the receiver ahead of its account's
                # earlier events when they were still retrying, and a failed attempt left a
                # dead letter that nothing removed (holding retention's floor).
                log.info(
                    "endpoint %s: event %s is sent again in its turn",
                    name,
                    event_id(ledger_id, sequence),
                )
                continue
            try:
                outcome = await self.deliver(endpoint, found, ledger_id, once=True)
            except asyncio.CancelledError:  # stopped: this request and the rest wait for a start
                for kept in requests[index:]:
                    self.state.request_replay(name, *kept)
                raise
            if outcome == "delivered":
                self.state.forget_dead_letter(name, sequence)
            elif outcome == "disabled":
                self.state.request_replay(name, sequence, kind)
            elif sequence >= position:
                # Dead again, but a `--from` rewind in these requests has the walk send it
                # too: forgotten once that delivers it (else listed for good, holding the
                # retention floor).
                self._rewound_dead.setdefault(name, set()).add(sequence)
        self._positions[name] = position
        return position

    async def deliver(
        self, endpoint: Endpoint, record: OutboxRecord, ledger_id: str, *, once: bool = False
    ) -> Outcome:
        """One event to one endpoint, retried until delivered or dead-lettered, or until the
        endpoint is disabled (this event's 410, or another's). `once`: one attempt, and a
        dead letter if it fails (a replay of one event runs in the endpoint's loop: retried
        there with back-off, it held every other account's events for up to a day)."""
        event = render(record, ledger_id)
        body = msgspec.json.encode(event)
        name = endpoint.config.name
        attempt = 0
        while True:
            await self._pause_over(name)
            if name in self.disabled:
                return "disabled"
            attempt += 1
            sending = self._sending.setdefault(name, set())
            sending.add(record.sequence)
            try:
                answer = await self._attempt(endpoint, event.id, body)
            finally:
                sending.discard(record.sequence)
            if answer.delivered:
                series = self._delivered.get(name)
                if series is None:
                    series = self._delivered[name] = (
                        self._metrics.webhook_delivered.labels(name),
                        self._metrics.webhook_delivery_seconds.labels(name),
                    )
                series[0].inc()
                series[1].observe(max(0.0, self._clock.now() - record.created_ms / 1000))
                return "delivered"
            self._metrics.webhook_failures.labels(name, answer.error).inc()
            if answer.status == 410:
                self._disable(name, answer, event.id)
                return "disabled"
            if answer.redirect:
                log.warning(
                    "endpoint %s: %s answered %d, a redirect to %s: not followed, a failed "
                    "attempt; set the endpoint's url to where it should deliver",
                    name,
                    event.id,
                    answer.status,
                    shown_location(answer.location),
                )
            now = self._clock.now()
            # Before a burial too: a 429's or 503's Retry-After is about the receiver, and
            # the endpoint's next event must wait for it (a replayed event's single attempt
            # was buried first, and the next went straight into the rate limit).
            self._pause(name, answer, now)
            age_seconds = now - record.created_ms / 1000
            if once or age_seconds >= endpoint.config.retry_max_age_seconds:
                self._bury(
                    name,
                    DeadLetter(
                        sequence=record.sequence,
                        event_id=event.id,
                        attempts=attempt,
                        last_error=answer.error,
                        dead_ms=int(now * 1000),
                    ),
                )
                return "dead_letter"
            await self._clock.sleep(
                backoff_seconds(
                    attempt,
                    self._config.backoff_initial_seconds,
                    self._config.backoff_max_seconds,
                    self._jitter(),
                )
            )

    def _disable(self, name: str, answer: Answer, event_id: str) -> None:
        """A 410 Gone: the receiver wants no more (Standard Webhooks). Recorded in the state so
        that it holds across restarts; the first 410 is the reason kept."""
        if name in self.disabled:
            return
        why = Disabled(
            since_ms=int(self._clock.now() * 1000), reason=answer.error, event_id=event_id
        )
        self.disabled[name] = self.state.disable(name, why)
        log.warning(
            "endpoint %s: %s answered 410 Gone: endpoint disabled, nothing more is delivered to "
            "it until `processor webhooks enable %s`",
            name,
            event_id,
            name,
        )

    def _pause(self, name: str, answer: Answer, now: float) -> None:
        """Honour a 429's or 503's Retry-After: no attempt to the endpoint before it ends."""
        if answer.status not in RETRY_AFTER_STATUSES or answer.retry_after is None:
            return
        maximum = self._config.backoff_max_seconds
        pause = pause_seconds(answer.status, answer.retry_after, now, maximum)
        shown = repr(answer.retry_after[:RETRY_AFTER_SHOWN_CHARACTERS_MAX])
        if pause is None:
            log.info(
                "endpoint %s: answered %d with an unreadable Retry-After %s: the usual back-off",
                name,
                answer.status,
                shown,
            )
            return
        log.info(
            "endpoint %s: answered %d with Retry-After %s: no attempt for %.1f s%s",
            name,
            answer.status,
            shown,
            pause,
            " (the most webhooks.backoff_max_seconds allows)" if pause == maximum else "",
        )
        self._paused_until[name] = max(self._paused_until.get(name, 0.0), now + pause)

    async def _pause_over(self, name: str) -> None:
        """Wait out the endpoint's pause; another answer may lengthen it meanwhile."""
        while (left := self._paused_until.get(name, 0.0) - self._clock.now()) > 0:
            await self._clock.sleep(left)

    async def _attempt(self, endpoint: Endpoint, event_id: str, body: bytes) -> Answer:
        """One signed POST. Redirects are not followed (Standard Webhooks): a 3xx is answered
        like any other failure, so a moved receiver is fixed in the config, never guessed."""
        assert self._client is not None
        try:
            reply = await self._client.post(
                endpoint.config.url,
                body,
                headers(endpoint.secrets, event_id, int(self._clock.now()), body),
                endpoint.config.timeout_seconds,
            )
        except HttpError as failure:
            return Answer(status=0, failure=failure.kind)
        except TimeoutError:
            return Answer(status=0, failure="timeout")
        return Answer(status=reply.status, location=reply.location, retry_after=reply.retry_after)


class Answer(msgspec.Struct, frozen=True, kw_only=True):
    """What one attempt got: an HTTP status and the headers the policy reads, or no answer
    at all (status 0) and why."""

    status: int
    failure: str = ""  # why there was no answer: connect_failed, disconnected, bad_answer, timeout
    location: str | None = None
    retry_after: str | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300

    @property
    def redirect(self) -> bool:
        return 300 <= self.status < 400

    @property
    def error(self) -> str:
        """The metric label and dead-letter reason: `http_503`, `connect_failed`, ..."""
        return self.failure if self.status == 0 else f"http_{self.status}"


LOCATION_SHOWN_CHARACTERS_MAX = 200
RETRY_AFTER_SHOWN_CHARACTERS_MAX = 40


def shown_location(location: str | None) -> str:
    """A Location header fit for a log line: without user info, query or fragment, which may
    carry credentials, and cut to a bounded length."""
    if not location:
        return "(no Location)"
    try:
        parts = urlsplit(location)
    except ValueError:
        return "(an unreadable Location)"
    if not parts.netloc:
        # No "//": urlsplit finds no host, and user info ("u:secret@host/x") sits in the
        # path. What comes before the last "@" goes, wherever it is.
        return (
            location.rpartition("@")[2].split("?")[0].split("#")[0][:LOCATION_SHOWN_CHARACTERS_MAX]
        )
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))[:LOCATION_SHOWN_CHARACTERS_MAX]
