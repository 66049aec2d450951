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

from processor.config import WebhookEndpoint
from processor.webhooks.commands import verify
from processor.webhooks.signing import (
    SecretError,
    endpoint_secrets,
    headers,
    parse_secret,
    sign,
    signatures,
)

RAW = b"0123456789abcdef0123456789abcdef"
SECRET = "whsec_" + base64.b64encode(RAW).decode()
TIMESTAMP = 1_795_486_000  # 2026-11-24T02:06:40Z
BODY = b'{"id":"evt_1","type":"authorization.approved"}'
# HMAC-SHA256 of "evt_1.1795486000.{BODY}" with RAW, in base64, computed apart from our code:
# printf '%s' 'evt_1.1795486000.{"id":...}' | openssl dgst -sha256 -hmac 0123...cdef -binary
GOLDEN = "v1,MoYlKPna4ej+2/20H0xEmTCarybN5FDmgQL54WmT3pE="
# The same with b"fedcba9876543210fedcba9876543210", the secret a rotation brings in.
RAW_NEXT = b"fedcba9876543210fedcba9876543210"
SECRET_NEXT = "whsec_" + base64.b64encode(RAW_NEXT).decode()
GOLDEN_NEXT = "v1,W8B6FEBW1f1sOlFWyZ1HgfoAvSAVtCzp9rAsyVadXtE="
SECRET_OTHER = "whsec_" + base64.b64encode(b"x" * 32).decode()


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
    signed = headers([parse_secret(SECRET, "test")], "evt_2", TIMESTAMP, body)
    assert signed["webhook-timestamp"] == "1795486000"
    assert Webhook(SECRET).verify(body, signed) == {"id": "evt_2", "n": 1}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(body.replace(b"1", b"2"), signed)
    stale = headers([parse_secret(SECRET, "test")], "evt_2", TIMESTAMP - 301, body)
    with pytest.raises(WebhookVerificationError, match="too old"):  # the 5-minute replay window
        Webhook(SECRET).verify(body, stale)


def test_our_verification_keeps_the_replay_window_on_the_time_given() -> None:
    secrets = [parse_secret(SECRET, "test")]
    signed = headers(secrets, "evt_3", TIMESTAMP, BODY)
    assert verify(secrets, signed, BODY, now=TIMESTAMP + 300)
    assert verify(secrets, signed, BODY, now=TIMESTAMP - 300)
    assert not verify(secrets, signed, BODY, now=TIMESTAMP + 301)
    assert not verify(secrets, signed, BODY, now=TIMESTAMP - 301)
    assert not verify(secrets, signed, BODY + b" ", now=TIMESTAMP)


def test_two_secrets_two_signatures_in_the_order_configured() -> None:
    secrets = [parse_secret(SECRET, "a"), parse_secret(SECRET_NEXT, "b")]
    assert signatures(secrets, "evt_1", TIMESTAMP, BODY) == f"{GOLDEN} {GOLDEN_NEXT}"
    assert signatures(secrets[::-1], "evt_1", TIMESTAMP, BODY) == f"{GOLDEN_NEXT} {GOLDEN}"
    assert headers(secrets, "evt_1", TIMESTAMP, BODY)["webhook-signature"] == (
        f"{GOLDEN} {GOLDEN_NEXT}"
    )


@pytest.mark.usefixtures("frozen_library_clock")
def test_a_receiver_with_either_secret_verifies_one_with_neither_does_not() -> None:
    secrets = [parse_secret(SECRET, "a"), parse_secret(SECRET_NEXT, "b")]
    signed = headers(secrets, "evt_1", TIMESTAMP, BODY)
    expected = {"id": "evt_1", "type": "authorization.approved"}
    assert Webhook(SECRET).verify(BODY, signed) == expected  # before switching
    assert Webhook(SECRET_NEXT).verify(BODY, signed) == expected  # after switching
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET_OTHER).verify(BODY, signed)
    # Our own receiver (`webhooks listen`) takes several secrets the same way.
    assert verify([parse_secret(SECRET_NEXT, "b")], signed, BODY, now=TIMESTAMP)
    assert not verify([parse_secret(SECRET_OTHER, "c")], signed, BODY, now=TIMESTAMP)


def test_our_receiver_refuses_a_timestamp_of_other_digits_instead_of_failing() -> None:
    """ "²" is a digit to isdigit(): int() then raised, a 500 from `webhooks listen`."""
    signed = headers([parse_secret(SECRET, "a")], "evt_1", TIMESTAMP, BODY)
    signed["webhook-timestamp"] = "\u00b2"
    assert not verify([parse_secret(SECRET, "a")], signed, BODY, now=TIMESTAMP)


def configured(*variables: str) -> WebhookEndpoint:
    return WebhookEndpoint(name="main", url="https://hooks.example/", secret_envs=variables)


def test_endpoint_secrets_come_from_the_variables_named_in_order() -> None:
    environment = {"HOOK_A": SECRET, "HOOK_B": SECRET_NEXT}
    assert endpoint_secrets(configured("HOOK_B", "HOOK_A"), "$.e", environment) == (RAW_NEXT, RAW)


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"HOOK_A": SECRET}, r"^\$\.e\.secret_envs\[1\]: environment variable HOOK_B is not set$"),
        (
            {"HOOK_A": SECRET, "HOOK_B": "whsec_" + base64.b64encode(b"y" * 20).decode()},
            r"^\$\.e\.secret_envs\[1\] \(HOOK_B\): signing secret of 20 bytes, at least 24",
        ),
        (
            {"HOOK_A": SECRET, "HOOK_B": SECRET},
            r"^\$\.e\.secret_envs\[1\] \(HOOK_B\): the same secret as HOOK_A",
        ),
    ],
)
def test_each_secret_is_checked_and_an_error_names_its_entry(
    environment: dict[str, str], message: str
) -> None:
    with pytest.raises(SecretError, match=message) as caught:
        endpoint_secrets(configured("HOOK_A", "HOOK_B"), "$.e", environment)
    for value in environment.values():
        assert value not in str(caught.value)  # never the secret itself
        assert value[len("whsec_") :] not in str(caught.value)


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
