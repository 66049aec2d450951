"""`processor webhooks status | replay | enable | listen`: operating the delivery of events."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import sys
import time
from collections.abc import Sequence

import msgspec

from processor.config import Config
from processor.events import event_id
from processor.ledger.store import Ledger
from processor.webhooks.signing import SecretError, parse_secret, sign
from processor.webhooks.state import DeliveryState, state_path

REPLAY_WINDOW_SECONDS = 300  # the Standard Webhooks default tolerance
DEAD_LETTERS_LISTED_MAX = 20  # named one by one in `webhooks status`; the rest counted


def status(config: Config, now: float) -> int:
    """Each endpoint's position, backlog and dead letters; `now` (Unix seconds) ages them."""
    ledger = Ledger(config.ledger.path, map_size_bytes=config.ledger.map_size_bytes, readonly=True)
    where = state_path(config)
    state = DeliveryState(where, readonly=True) if (where / "data.mdb").exists() else None
    try:
        with ledger.read() as reader:
            last = reader.outbox_last_sequence()
            names = [endpoint.name for endpoint in config.webhooks.endpoints]
            print(f"outbox: {last} events")
            if not names:
                print("no endpoints configured (webhooks.endpoints)")
            for name in names:
                position = state.position(name) if state is not None else 1
                backlog = max(0, last - position + 1)
                waiting = reader.outbox(position, 1) if backlog else []
                age = now - waiting[0].created_ms / 1000 if waiting else 0.0
                dead = state.dead_letters(name) if state is not None else []
                print(
                    f"endpoint {name}: delivered up to {position - 1}, backlog {backlog}, "
                    f"oldest undelivered {age:.1f}s, dead letters {len(dead)}"
                )
                why = state.disabled(name) if state is not None else None
                if why is not None:
                    print(
                        f"  disabled since {why.since}: {why.reason} answering "
                        f"{why.event_id}; nothing is delivered to it until "
                        f"`processor webhooks enable {name}`"
                    )
                ids = reader.event_ids()
                for letter in dead[:DEAD_LETTERS_LISTED_MAX]:
                    named = event_id(ids.prefix(letter.sequence), letter.sequence)
                    print(
                        f"  dead {named} (sequence "
                        f"{letter.sequence}): {letter.attempts} attempts, {letter.last_error}"
                    )
                if len(dead) > DEAD_LETTERS_LISTED_MAX:
                    # A dead endpoint at 2,000 events/s makes 100,000 in a minute: a line
                    # each was a status nobody could read.
                    print(
                        f"  ... and {len(dead) - DEAD_LETTERS_LISTED_MAX} more dead letters, "
                        f"up to sequence {dead[-1].sequence} (`replay --from "
                        f"{dead[DEAD_LETTERS_LISTED_MAX].sequence}` delivers them again)"
                    )
    finally:
        ledger.close()
        if state is not None:
            state.close()
    return 0


def replay(config: Config, endpoint: str, first: int | None, event: str | None) -> int:
    configured = {e.name: e for e in config.webhooks.endpoints}
    if endpoint not in configured:
        print(f"processor: no endpoint {endpoint!r} in webhooks.endpoints", file=sys.stderr)
        return 2
    if event is not None:
        ledger = Ledger(config.ledger.path, readonly=True)
        try:
            with ledger.read() as reader:
                found = reader.event_ids().sequence(event)
                records = reader.outbox(found, 1) if found is not None else []
        finally:
            ledger.close()
        if found is None:
            print(f"processor: {event!r} is not an event id of this ledger", file=sys.stderr)
            return 2
        if records and records[0].sequence == found:
            event_type = records[0].type
            if not configured[endpoint].wants(event_type):
                # Accepted, it was sent if the endpoint had passed it and never otherwise.
                print(
                    f"processor: endpoint {endpoint} does not subscribe to {event_type} events "
                    f"(webhooks.endpoints event_types); {event} is not sent to it",
                    file=sys.stderr,
                )
                return 2
        sequence, kind = found, "one"
    else:
        assert first is not None
        sequence, kind = first, "from"
    state = DeliveryState(state_path(config))
    try:
        state.request_replay(endpoint, sequence, kind)
    finally:
        state.close()
    what = f"event {event}" if event else f"every event from sequence {first}"
    print(f"replay of {what} to {endpoint} requested; the running daemon delivers it")
    return 0


def enable(config: Config, endpoint: str) -> int:
    """Deliver to an endpoint a 410 Gone disabled: from where it stopped, the event answered
    410 first. The running daemon notices within a second; a stopped one at its start."""
    if endpoint not in {e.name for e in config.webhooks.endpoints}:
        print(f"processor: no endpoint {endpoint!r} in webhooks.endpoints", file=sys.stderr)
        return 2
    state = DeliveryState(state_path(config))
    try:
        why = state.enable(endpoint)
        position = state.position(endpoint)
    finally:
        state.close()
    if why is None:
        print(f"endpoint {endpoint} is not disabled; nothing to do")
        return 0
    print(
        f"endpoint {endpoint} enabled (disabled since {why.since}: {why.reason} "
        f"answering {why.event_id}); delivery resumes from sequence {position}"
    )
    return 0


def verify(secrets: Sequence[bytes], headers: dict[str, str], body: bytes, now: float) -> bool:
    """Standard Webhooks verification: timestamp in the window, and one of the offered
    signatures over id.timestamp.body made with one of `secrets` (a rotation offers several)."""
    message_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not message_id or not (timestamp.isascii() and timestamp.isdigit()):
        return False  # ("²" is a digit to isdigit(), and int() refuses it: a 500 in listen)
    if abs(now - int(timestamp)) > REPLAY_WINDOW_SECONDS:
        return False
    offered = [s.encode() for s in headers.get("webhook-signature", "").split(" ") if s]
    for secret in secrets:
        expected = sign(secret, message_id, int(timestamp), body).encode()
        if any(hmac.compare_digest(expected, candidate) for candidate in offered):
            return True
    return False


def listen(host: str, port: int, secret_envs: Sequence[str]) -> int:
    from aiohttp import web

    secrets: list[bytes] = []
    for variable in secret_envs:
        value = os.environ.get(variable, "")
        if not value:
            print(f"processor: environment variable {variable} is not set", file=sys.stderr)
            return 2
        try:
            secrets.append(parse_secret(value, variable))
        except SecretError as error:
            print(f"processor: {error}", file=sys.stderr)
            return 2

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not verify(secrets, headers, body, time.time()):
            print(f"REJECTED {headers.get('webhook-id', '?')}: bad signature", flush=True)
            return web.json_response({"error": {"code": "bad_signature"}}, status=400)
        try:
            event = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return web.json_response({"error": {"code": "not_json"}}, status=400)
        print(msgspec.json.encode(event).decode(), flush=True)
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        print(
            f"listening on {host}:{runner.addresses[0][1]}, verifying with "
            + " or ".join(secret_envs),
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
