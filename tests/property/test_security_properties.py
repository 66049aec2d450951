"""PanHasher's pre-keyed HMAC equals the standard library's HMAC-SHA256."""

import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from processor.security import PanHasher, mask_pan


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
