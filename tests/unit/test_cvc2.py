"""CVC2: the library against published vectors, the keys from the environment, rotation."""

from __future__ import annotations

import psec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.config import CardVerificationRange
from processor.cvc2 import (
    INSECURE_DEVELOPMENT_CVK,
    CardVerificationError,
    compute_cvc2,
    key_check_value,
    keys_from_environment,
)

# The key of the published examples (IBM's CVV Generate, psec's documentation).
PUBLISHED_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
KEY_A = "4A6F686E4361726473313233343536FE"
KEY_B = "89ABCDEF0123456776543210FEDCBA98"


def test_the_library_gives_the_published_values() -> None:
    # IBM ICSF, CVV Generate: PAN 4123456789012345, expiry 8701, service code 101,
    # key A 0123456789ABCDEF, key B FEDCBA9876543210: CVV 561.
    assert psec.cvv.generate_cvv(PUBLISHED_KEY, "4123456789012345", "8701", "101") == "561"
    # psec's documented example.
    assert psec.cvv.generate_cvv(PUBLISHED_KEY, "1234567890123456", "9912", "220") == "170"
    # The key check value of the same key (the first bytes of 08D7B4FB629D0885, 3DES of zeros).
    assert key_check_value(PUBLISHED_KEY) == "08D7B4"


@given(
    pan=st.from_regex(r"^[0-9]{13,19}$", fullmatch=True),
    expiry=st.from_regex(r"^[0-9]{2}(0[1-9]|1[0-2])$", fullmatch=True),
)
def test_the_cvc2_is_the_cvv_method_with_service_code_000(pan: str, expiry: str) -> None:
    value = psec.cvv.generate_cvv(PUBLISHED_KEY, pan, expiry, "000")
    expected = value if len(value) == 3 else None  # a number without one: never issued
    assert compute_cvc2(PUBLISHED_KEY, pan, expiry) == expected
    assert expected is None or expected.isdigit()


def test_keys_come_from_the_named_variables_and_the_first_issues() -> None:
    ranges = (CardVerificationRange(bin_prefix="476173", key_envs=("NEW", "OLD")),)
    keys = keys_from_environment(ranges, {"NEW": KEY_B, "OLD": KEY_A})
    issuing = keys.issuing("4761739001010085")
    assert issuing is not None and issuing[1] == bytes.fromhex(KEY_B)
    assert keys.issuing("5200001234567890") is None  # no key for that range
    # Each key still verifies the cards it computed: a card names its key by check value.
    pan, expiry = "4761739001010085", "3012"
    old = compute_cvc2(bytes.fromhex(KEY_A), pan, expiry)
    assert old is not None
    assert keys.verify(key_check_value(bytes.fromhex(KEY_A)), pan, expiry, old) is True
    assert keys.verify(key_check_value(bytes.fromhex(KEY_B)), pan, expiry, old) is (
        old == compute_cvc2(bytes.fromhex(KEY_B), pan, expiry)
    )
    assert keys.verify("000000", pan, expiry, old) is None  # a key no longer configured
    assert keys.verify(key_check_value(bytes.fromhex(KEY_A)), pan, expiry, "12") is False
    assert KEY_A not in repr(keys) and KEY_B not in repr(keys)


def test_the_narrowest_range_issues() -> None:
    ranges = (
        CardVerificationRange(bin_prefix="476173", key_envs=("WIDE",)),
        CardVerificationRange(bin_prefix="47617390", key_envs=("NARROW",)),
    )
    keys = keys_from_environment(ranges, {"WIDE": KEY_A, "NARROW": KEY_B})
    assert keys.issuing("4761739001010085") == (
        key_check_value(bytes.fromhex(KEY_B)),
        bytes.fromhex(KEY_B),
    )
    assert keys.issuing("4761731001010085") == (
        key_check_value(bytes.fromhex(KEY_A)),
        bytes.fromhex(KEY_A),
    )


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "key_envs[0]: CVK is not set"),
        ({"CVK": "xyz"}, "key_envs[0]: CVK is not hexadecimal"),
        ({"CVK": "00" * 8}, "key_envs[0]: CVK holds 8 bytes"),
        ({"CVK": "0123456789ABCDEF" * 2}, "single-length DES repeated"),
        # Halves apart by a parity bit only: single DES all the same (it was accepted).
        ({"CVK": "2345678923456789" + "2245678923456789"}, "single-length DES repeated"),
        ({"CVK": PUBLISHED_KEY.hex()}, "a published development key (check value 08D7B4)"),
        # The same key with other parity bits (DES ignores them) is the same key.
        (
            {"CVK": bytes(byte ^ 1 for byte in PUBLISHED_KEY).hex()},
            "a published development key",
        ),
        ({"CVK": KEY_A, "AGAIN": KEY_A}, "key_envs[1]: AGAIN holds the same key as"),
    ],
)
def test_a_bad_key_names_its_setting_never_its_value(
    environ: dict[str, str], expected: str
) -> None:
    names = ("CVK", "AGAIN") if "AGAIN" in environ else ("CVK",)
    ranges = (CardVerificationRange(bin_prefix="476173", key_envs=names),)
    with pytest.raises(CardVerificationError) as caught:
        keys_from_environment(ranges, environ)
    assert str(caught.value).startswith("$.security.card_verification_keys[0].key_envs[")
    assert expected in str(caught.value)
    for value in environ.values():
        assert value not in str(caught.value)


def test_the_development_key_is_the_published_one() -> None:
    ranges = (CardVerificationRange(bin_prefix="476173", development_key=True),)
    keys = keys_from_environment(ranges, {})
    assert keys.issuing("4761739001010085") == (
        key_check_value(INSECURE_DEVELOPMENT_CVK),
        INSECURE_DEVELOPMENT_CVK,
    )


def test_a_range_without_a_key_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="key_envs names no key"):
        CardVerificationRange(bin_prefix="476173")
