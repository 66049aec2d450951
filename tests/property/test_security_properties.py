"""PanHasher's pre-keyed HMAC equals the standard library's HMAC-SHA256; masking a message
leaves no card number in it."""

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.security import PanHasher, luhn_valid, mask_card_numbers, mask_pan


@settings(max_examples=300, deadline=None)
@given(key=st.binary(min_size=1, max_size=200), data=st.binary(max_size=300))
def test_hmac_equals_the_standard_library(key: bytes, data: bytes) -> None:
    hasher = PanHasher(key)
    expected = hmac.new(key, data, hashlib.sha256).digest()
    assert hasher.digest(data) == expected[:16]
    assert hasher._hmac(data) == expected
    assert hasher._hmac(data) == expected  # the pre-keyed states are not consumed by a call


@settings(max_examples=200, deadline=None)
@given(key=st.binary(min_size=1, max_size=100), pan=st.text("0123456789", min_size=13, max_size=19))
def test_card_key_is_hmac_of_the_pan_and_masking_keeps_six_and_four(key: bytes, pan: str) -> None:
    assert PanHasher(key).card_key(pan) == hmac.new(key, pan.encode(), hashlib.sha256).digest()
    masked = mask_pan(pan)
    assert masked[:6] == pan[:6] and masked[-4:] == pan[-4:]
    assert set(masked[6:-4]) <= {"*"} and len(masked) == len(pan)


def with_check_digit(body: str) -> str:
    """`body` and the Luhn check digit that makes it valid."""
    return next(body + digit for digit in "0123456789" if luhn_valid(body + digit))


@settings(max_examples=500, deadline=None)
@given(
    body=st.text("0123456789", min_size=12, max_size=18),
    before=st.sampled_from(["", "1", "13", "019"]),
    after=st.sampled_from(["", "12", "2512", "0"]),
    around=st.sampled_from([("", ""), ("no account '", "'"), ("id-", "-x")]),
)
def test_a_message_quoting_a_card_number_shows_at_most_its_first_six_and_last_four(
    body: str, before: str, after: str, around: tuple[str, str]
) -> None:
    """In messages (not logs, which mask every run), a 13-15-digit card number followed by
    its expiry, or after a length prefix, came back in clear: the run as a whole fails the
    Luhn check."""
    run = before + with_check_digit(body) + after
    masked = run[:6] + "*" * (len(run) - 10) + run[-4:]
    assert mask_card_numbers(around[0] + run + around[1]) == around[0] + masked + around[1]


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        # Card numbers in fours by any separator an id allows, the last group shorter for a
        # 13-, 17-, 18- or 19-digit number: its last group was left in clear, or all of it.
        ("4222.2222.2222.2", "4222.22**.*222.2"),
        ("6011.0000.9990.0000.4", "6011.00**.****.*000.4"),
        ("6011.0000.9990.0000.15", "6011.00**.****.**00.15"),
        ("4761:7390:0101:0010", "4761:73**:****:0010"),
        # As American Express (4-6-5) and Diners (4-6-4) print them, or a last group longer.
        ("acct:3782_822463_10005", "acct:3782_82****_*0005"),
        ("acct:3056.930902.5904", "acct:3056.93****.5904"),
        ("4111.1111.1111.11112", "4111.11**.****.*1112"),
        # A group in front (an expiry, a year): the whole run masked, not the number's tail
        # left in clear (a 16-digit cap started the match at the group in front).
        ("ref 0001_5555_5555_5555_4444", "ref 0001_55**_****_****_4444"),
        ("/v1/cards/2026/4111/1111/1111/1111", "/v1/cards/2026/41**/****/****/1111"),
        # Not card numbers: times, file names, bounds in thousands, addresses.
        ("1765100000.123456", "1765100000.123456"),
        ("backup_20261124_120000.tar", "backup_20261124_120000.tar"),
        ("1_000_000_000_000_000", "1_000_000_000_000_000"),
        ("2026-12-07 10:00:00.123456+00:00", "2026-12-07 10:00:00.123456+00:00"),
        ("192.168.100.200:8080", "192.168.100.200:8080"),
    ],
)
def test_grouped_numbers_are_masked_as_card_numbers_and_nothing_else(
    written: str, shown: str
) -> None:
    assert mask_card_numbers(written) == shown
    assert mask_card_numbers(written, every_run=True) == shown


def test_a_number_in_front_takes_no_group_of_a_grouped_card_number() -> None:
    """Split from it by a space, a 9-digit number took the card's first group as its own
    (13 digits), and the 12 left were too few to be masked: the card number came out whole."""
    text = "txn 123456789 4111.1111.1111.1111"
    assert mask_card_numbers(text) == "txn 123456789 4111.11**.****.1111"
    # Logs mask every long run besides, the number in front with the group after it.
    assert mask_card_numbers(text, every_run=True).endswith(" 4111.11**.****.1111")
