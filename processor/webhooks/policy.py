"""When to try an endpoint again: exponential back-off with jitter, or what the receiver asked.

Pure functions, time and jitter passed in, so the policy is tested on logical time. A 429 (Too
Many Requests) or 503 (Service Unavailable) may carry `Retry-After` (RFC 9110 section 10.2.3),
as delta-seconds (`120`) or an HTTP-date (`Wed, 21 Oct 2026 07:28:00 GMT`); the endpoint then
makes no attempt before that, capped by `webhooks.backoff_max_seconds` so a receiver cannot park
an endpoint for longer than the operator allows. An absent or unreadable value leaves the usual
back-off.
"""

from __future__ import annotations

from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Final

RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
# Above any cap a config can sensibly hold (about 31 years), and small enough for a float.
RETRY_AFTER_SECONDS_CEILING: Final = 10**9
# 2.0**1023 is the largest power of two a float holds; past it the product is inf, which
# min() turns into the maximum.
BACKOFF_DOUBLINGS_MAX: Final = 1023


def backoff_seconds(attempt: int, initial: float, maximum: float, jitter: float) -> float:
    """The wait after failed attempt number `attempt` (1, 2, ...): `initial` doubled per
    attempt, at most `maximum`, times `jitter` (0.5 to 1.0 in the daemon)."""
    assert attempt >= 1, attempt
    doublings = min(attempt - 1, BACKOFF_DOUBLINGS_MAX)
    return min(maximum, initial * float(2**doublings)) * jitter


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds from `now` (Unix time) that a Retry-After value asks to wait; 0 for a date
    already past; None when absent or unreadable (a fraction, a sign, words, a bad date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(min(int(text), RETRY_AFTER_SECONDS_CEILING))
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # the asctime form and "-0000" carry no zone: HTTP means GMT
        moment = moment.replace(tzinfo=UTC)
    return min(max(0.0, moment.timestamp() - now), float(RETRY_AFTER_SECONDS_CEILING))


def pause_seconds(status: int, retry_after: str | None, now: float, maximum: float) -> float | None:
    """How long the endpoint makes no attempt after this answer: the Retry-After of a 429 or
    503, at most `maximum`; None when the answer asks for nothing (the back-off decides)."""
    if status not in RETRY_AFTER_STATUSES:
        return None
    asked = retry_after_seconds(retry_after, now)
    return None if asked is None else min(asked, maximum)
