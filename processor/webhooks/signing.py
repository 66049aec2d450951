"""Standard Webhooks signatures (https://www.standardwebhooks.com): HMAC-SHA256 over
`{webhook-id}.{webhook-timestamp}.{body}` with the base64 secret after its `whsec_` prefix,
sent as `webhook-signature: v1,<base64>`. Receivers verify with any Standard Webhooks library;
they should refuse timestamps more than 5 minutes from their clock (replay window).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

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


def sign(secret: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, message_id, timestamp, body),
    }
