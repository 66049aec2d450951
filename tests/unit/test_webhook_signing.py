"""Our Standard Webhooks signatures, checked with the `standardwebhooks` package."""

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from processor.webhooks.signing import SecretError, headers, parse_secret, sign

RAW = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(RAW).decode()


def test_signature_equals_the_reference_library() -> None:
    now = int(time.time())
    body = b'{"id":"evt_1","type":"authorization.approved"}'
    reference = Webhook(SECRET).sign("evt_1", datetime.fromtimestamp(now, UTC), body.decode())
    assert sign(parse_secret(SECRET, "test"), "evt_1", now, body) == reference


def test_reference_library_verifies_and_rejects_tampering() -> None:
    body = b'{"id":"evt_2","n":1}'
    signed = headers(parse_secret(SECRET, "test"), "evt_2", int(time.time()), body)
    assert Webhook(SECRET).verify(body, signed) == {"id": "evt_2", "n": 1}
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body.replace(b"1", b"2"), signed)
    stale = headers(parse_secret(SECRET, "test"), "evt_2", int(time.time()) - 3600, body)
    with pytest.raises(WebhookVerificationError):  # outside the 5-minute replay window
        Webhook(SECRET).verify(body, stale)


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
