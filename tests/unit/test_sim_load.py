"""The load generator's template patching (no socket)."""

import pytest

from processor.sim.load import stan_offset
from processor.wire.codec import Codec
from processor.wire.spec import load_spec

CODEC = Codec(load_spec())


@pytest.mark.parametrize("seconds", ["09", "59", "00", "19"])
def test_stan_offset_is_not_fooled_by_field_7_digits(seconds: str) -> None:
    # Field 7 ending in 9 right before a STAN of 9s once made a digit search land one byte early.
    fields = {"t": "0800", "7": f"11240259{seconds}", "11": "999999", "70": "301"}
    offset = stan_offset(CODEC, fields)
    template = CODEC.encode(fields)
    patched = template[:offset] + b"000042" + template[offset + 6 :]
    decoded = CODEC.decode(patched)
    assert decoded.stan == "000042"
    assert decoded.echo["7"] == f"11240259{seconds}"
