"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over
`{webhook-id}.{webhook-timestamp}.{body}` with the base64 secret after its `whsec_` prefix,
sent as `webhook-signature: v1,<base64>`. An endpoint with several secrets (a rotation under
way) gets one `v1,<base64>` per secret, space-separated, in the order configured; receivers
accept a request when any one of them verifies. Receivers verify with any Standard Webhooks
library; they should refuse timestamps more than 5 minutes from their clock (replay window).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence

from processor.config import WebhookEndpoint

PREFIX = "whsec_"
# Standard Webhooks: secrets of 24 to 64 random bytes. A shorter one is refused at start.
SECRET_BYTES_MIN = 24


class SecretError(ValueError):
    pass


def parse_secret(text: str, where: str) -> bytes:
    raw = text[len(PREFIX) :] if text.startswith(PREFIX) else text
    try:
        secret = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"{where}: not a base64 (whsec_...) signing secret") from None
    if len(secret) < SECRET_BYTES_MIN:
        raise SecretError(
            f"{where}: signing secret of {len(secret)} bytes, at least {SECRET_BYTES_MIN} needed"
        )
    return secret


def endpoint_secrets(
    endpoint: WebhookEndpoint, where: str, environment: Mapping[str, str]
) -> tuple[bytes, ...]:
    """The endpoint's secrets from the variables its `secret_envs` name, each checked.

    `where` locates the endpoint in the config (`$.webhooks.endpoints[0]`); an error names the
    entry and its variable, never the value.
    """
    secrets: list[bytes] = []
    for position, variable in enumerate(endpoint.secret_envs):
        entry = f"{where}.secret_envs[{position}]"
        value = environment.get(variable)
        if not value:
            raise SecretError(f"{entry}: environment variable {variable} is not set")
        secret = parse_secret(value, f"{entry} ({variable})")
        if secret in secrets:
            earlier = endpoint.secret_envs[secrets.index(secret)]
            raise SecretError(
                f"{entry} ({variable}): the same secret as {earlier}; a rotation needs a new one"
            )
        secrets.append(secret)
    return tuple(secrets)


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.digest(secret, signed, "sha256")  # one-shot in C; hmac.new wraps it in Python
    return "v1," + base64.b64encode(digest).decode()


def signatures(secrets: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one `v1,<base64>` per secret, space-separated."""
    assert secrets, "an endpoint has at least one secret (config: secret_envs)"
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets)


def headers(
    secrets: Sequence[bytes], message_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signatures(secrets, message_id, timestamp, body),
    }
