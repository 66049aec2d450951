"""The retry policy as pure functions: back-off, and Retry-After in both of its forms."""

from __future__ import annotations

import pytest

from processor.webhooks.policy import backoff_seconds, pause_seconds, retry_after_seconds

NOW = 1_445_412_450.0  # 2015-10-21T07:27:30Z, 30 s before the dates below


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),  # optional whitespace around a header value
        ("99999999999999999999999", 1e9),  # absurd, but a number: the cap applies later
        # HTTP-date, all three forms a recipient must read (RFC 9110 section 5.6.7)
        ("Wed, 21 Oct 2015 07:28:00 GMT", 30.0),  # IMF-fixdate
        ("Wednesday, 21-Oct-15 07:28:00 GMT", 30.0),  # obsolete RFC 850
        ("Wed Oct 21 07:28:00 2015", 30.0),  # obsolete asctime, no zone: GMT
        ("Wed, 21 Oct 2015 07:30:00 GMT", 150.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # already past: no wait asked
    ],
)
def test_retry_after_read_in_both_forms(value: str, seconds: float) -> None:
    assert retry_after_seconds(value, NOW) == seconds


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "-5", "1.5", "5s", "+5", "²", "Wed, 32 Oct 2015 07:28:00 GMT", "Wed, 21"],
)
def test_an_unreadable_retry_after_asks_for_nothing(value: str | None) -> None:
    assert retry_after_seconds(value, NOW) is None


@pytest.mark.parametrize("status", [429, 503])
def test_429_and_503_pause_for_retry_after_at_most_the_maximum(status: int) -> None:
    assert pause_seconds(status, "30", NOW, maximum=300.0) == 30.0
    assert pause_seconds(status, "Wed, 21 Oct 2015 07:28:00 GMT", NOW, maximum=300.0) == 30.0
    assert pause_seconds(status, "3600", NOW, maximum=300.0) == 300.0
    assert pause_seconds(status, "soon", NOW, maximum=300.0) is None
    assert pause_seconds(status, None, NOW, maximum=300.0) is None


@pytest.mark.parametrize("status", [500, 502, 504, 302, 410, 408, 200])
def test_other_statuses_ignore_retry_after(status: int) -> None:
    assert pause_seconds(status, "30", NOW, maximum=300.0) is None


def test_backoff_doubles_up_to_its_maximum_then_jitter_scales_it() -> None:
    delays = [backoff_seconds(n, initial=1.0, maximum=10.0, jitter=1.0) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_seconds(3, initial=1.0, maximum=10.0, jitter=0.5) == 2.0


def test_backoff_after_very_many_attempts_stays_at_its_maximum() -> None:
    # 2**5000 is no float: the doublings stop once past any maximum.
    assert backoff_seconds(5000, initial=0.5, maximum=1e300, jitter=1.0) == 1e300
