"""Our Standard Webhooks signatures, checked with the `standardwebhooks` package.

Every timestamp here is fixed, and the reference library's clock is frozen at it
(`frozen_library_clock`), so no test depends on when it runs.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, tzinfo

import pytest
import standardwebhooks.webhooks
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from processor.webhooks.commands import verify
from processor.webhooks.signing import SecretError, headers, parse_secret, sign

RAW = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(RAW).decode()
TIMESTAMP = 1_795_486_000  # 2026-11-24T22:06:40Z
BODY = b'{"id":"evt_1","type":"authorization.approved"}'
# HMAC-SHA256 of "evt_1.1795486000.{BODY}" with RAW, in base64, computed apart from our code:
# printf '%s' 'evt_1.1795486000.{"id":...}' | openssl dgst -sha256 -hmac 0123...cdef -binary
GOLDEN = "v1,MoYlKPna4ej+2/20H0xEmTCarybN5FDmgQL54WmT3pE="


class FrozenDatetime(datetime):
    """`datetime` whose now() is TIMESTAMP: what the reference library compares against."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> FrozenDatetime:
        return cls.fromtimestamp(TIMESTAMP, tz or UTC)


@pytest.fixture
def frozen_library_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", FrozenDatetime)


def test_signature_equals_the_golden_value_and_the_reference_library() -> None:
    ours = sign(parse_secret(SECRET, "test"), "evt_1", TIMESTAMP, BODY)
    assert ours == GOLDEN
    moment = datetime.fromtimestamp(TIMESTAMP, UTC)
    assert ours == Webhook(SECRET).sign("evt_1", moment, BODY.decode())


@pytest.mark.usefixtures("frozen_library_clock")
def test_reference_library_verifies_and_rejects_tampering() -> None:
    body = b'{"id":"evt_2","n":1}'
    signed = headers(parse_secret(SECRET, "test"), "evt_2", TIMESTAMP, body)
    assert signed["webhook-timestamp"] == "1795486000"
    assert Webhook(SECRET).verify(body, signed) == {"id": "evt_2", "n": 1}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(body.replace(b"1", b"2"), signed)
    stale = headers(parse_secret(SECRET, "test"), "evt_2", TIMESTAMP - 301, body)
    with pytest.raises(WebhookVerificationError, match="too old"):  # the 5-minute replay window
        Webhook(SECRET).verify(body, stale)


def test_our_verification_keeps_the_replay_window_on_the_time_given() -> None:
    secret = parse_secret(SECRET, "test")
    signed = headers(secret, "evt_3", TIMESTAMP, BODY)
    assert verify(secret, signed, BODY, now=TIMESTAMP + 300)
    assert verify(secret, signed, BODY, now=TIMESTAMP - 300)
    assert not verify(secret, signed, BODY, now=TIMESTAMP + 301)
    assert not verify(secret, signed, BODY, now=TIMESTAMP - 301)
    assert not verify(secret, signed, BODY + b" ", now=TIMESTAMP)


@pytest.mark.parametrize(
    "bad", ["whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_bad_secrets_are_refused(bad: str) -> None:
    with pytest.raises(SecretError, match="ENV_NAME"):
        parse_secret(bad, "ENV_NAME")


def test_the_shortest_secret_taken_is_24_bytes() -> None:
    # The boundary itself, both sides: a lowered minimum or an off-by-one fails here.
    shortest = "whsec_" + base64.b64encode(b"x" * 24).decode()
    assert parse_secret(shortest, "ENV_NAME") == b"x" * 24
    with pytest.raises(SecretError, match="ENV_NAME: signing secret of 23 bytes, at least 24"):
        parse_secret("whsec_" + base64.b64encode(b"x" * 23).decode(), "ENV_NAME")
