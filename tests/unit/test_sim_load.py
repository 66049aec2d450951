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


def test_a_duplicated_answer_fails_the_run() -> None:
    # Every request answered, but twice: the second copies match nothing, and that is a failure.
    import asyncio
    import threading

    from sim_fakes import FakeIssuer

    from processor.sim.load import LoadSpec, run_load

    issuer = FakeIssuer(duplicate=True)
    loop = asyncio.new_event_loop()
    port = loop.run_until_complete(issuer.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        spec = LoadSpec("127.0.0.1", port, rate=50, duration=0.2, connections=1, message="echo")
        assert run_load(spec) == 1
    finally:
        asyncio.run_coroutine_threadsafe(issuer.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
