"""Independent ISO 8583 client libraries, each in its own default format, against listeners
configured for them: py8583 (Python; ASCII bitmap, ascii4 framing here, since it leaves framing
to its user) and iso_8583 from npm (JavaScript; 2-byte length header, binary bitmap). Neither is
pyiso8583, which the processor itself uses, so a shared misreading of the standard cannot hide.

The JavaScript client needs Node.js and `npm ci --prefix tests/e2e/interop/js` (the README's test
command runs it); without them this module fails rather than skips, so CI cannot pass silently.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import RunningDaemon, next_stan
from py8583 import py8583, py8583spec

JS = Path(__file__).resolve().parent / "interop" / "js"
LISTENERS = """
[[listeners]]
name = "network"
port = 0
[[listeners]]
name = "js-peer"
port = 0
framing = "len2"
bitmap = "binary"
[[listeners]]
name = "py8583-peer"
port = 0
framing = "ascii4"
bitmap = "ascii"
"""
APPROVABLE = "4761739001010010"  # active, on the large account
FIFTY_EUROS = "4761739001010069"  # active, on an account holding 50.00 EUR


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    where = tmp_path_factory.mktemp("interop")
    config = where / "processor.toml"
    config.write_text(LISTENERS)
    running = RunningDaemon(where / "ledger", config=config).start()
    try:
        yield running
    finally:
        running.stop()


def authorization(pan: str, amount: int, stan: str) -> dict[str, str]:
    return {
        "0": "0100",
        "2": pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1202101010",
        "11": stan,
        "14": "3012",
        "18": "5411",
        "22": "051",
        "32": "123456",
        "37": f"4336{stan}00",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "ACME STORE               BERLIN       DE",
        "49": "978",
    }


def echo(stan: str) -> dict[str, str]:
    return {"0": "0800", "7": "1202101010", "11": stan, "70": "301"}


# --- iso_8583 (JavaScript) -------------------------------------------------------------------


def js_exchange(port: int, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    node = shutil.which("node")
    assert node is not None, "Node.js is needed for the JavaScript interop test"
    assert (JS / "node_modules" / "iso_8583").is_dir(), "run: npm ci --prefix tests/e2e/interop/js"
    done = subprocess.run(
        [node, str(JS / "exchange.js")],
        input=json.dumps({"port": port, "messages": messages}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    answers: list[dict[str, str]] = json.loads(done.stdout)
    return answers


def test_iso_8583_js_echo_approval_decline_and_retransmission(daemon: RunningDaemon) -> None:
    approve = authorization(APPROVABLE, 1234, next_stan())
    decline = authorization(FIFTY_EUROS, 6000, next_stan())
    sent = [echo(next_stan()), approve, decline, approve]
    answers = js_exchange(daemon.ports["js-peer"], sent)
    echoed, approved, declined, again = answers
    assert (echoed["0"], echoed["39"], echoed["11"]) == ("0810", "00", sent[0]["11"])
    assert (approved["0"], approved["39"], approved["11"]) == ("0110", "00", approve["11"])
    assert approved["4"] == approve["4"] and approved["37"] == approve["37"]
    assert len(approved["38"]) == 6
    assert (declined["39"], declined["11"]) == ("51", decline["11"])
    assert "38" not in declined
    assert again == approved  # a retransmission gets the stored answer, approval code included


# --- py8583 (Python) ---------------------------------------------------------------------------

_PY8583_INTEGERS = {"3", "4", "7", "11", "14", "18", "22", "49", "70"}  # fixed n: it wants ints


def py8583_encode(fields: dict[str, str]) -> bytes:
    message = py8583.Iso8583(IsoSpec=py8583spec.IsoSpec1987ASCII())
    message.MTI(fields["0"])
    for key, value in fields.items():
        if key != "0":
            message.Field(int(key), 1)  # the bitmap bit; FieldData sets the value only
            message.FieldData(int(key), int(value) if key in _PY8583_INTEGERS else value)
    data: bytes = message.BuildIso()
    return b"%04d" % len(data) + data


def py8583_decode(frame: bytes) -> dict[str, str]:
    message = py8583.Iso8583(frame, IsoSpec=py8583spec.IsoSpec1987ASCII())
    fields = {"0": message.MTI()}
    for number in range(2, 129):
        if message.Field(number) == 1:
            fields[str(number)] = str(message.FieldData(number))
    return fields


def py8583_exchange(port: int, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    answers = []
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as link,
        link.makefile("rb") as stream,
    ):
        for fields in messages:
            link.sendall(py8583_encode(fields))
            length = int(stream.read(4))
            answers.append(py8583_decode(stream.read(length)))
    return answers


def test_py8583_echo_approval_decline_and_retransmission(daemon: RunningDaemon) -> None:
    approve = authorization(APPROVABLE, 2345, next_stan())
    decline = authorization(FIFTY_EUROS, 7000, next_stan())
    sent = [echo(next_stan()), approve, decline, approve]
    echoed, approved, declined, again = py8583_exchange(daemon.ports["py8583-peer"], sent)
    # py8583 reads fixed numeric fields as integers: compare them as numbers.
    assert (echoed["0"], echoed["39"], int(echoed["11"])) == ("0810", "00", int(sent[0]["11"]))
    assert (approved["0"], approved["39"], int(approved["11"])) == (
        "0110",
        "00",
        int(approve["11"]),
    )
    assert int(approved["4"]) == 2345 and approved["37"] == approve["37"]
    assert len(approved["38"]) == 6
    assert (declined["39"], int(declined["11"])) == ("51", int(decline["11"]))
    assert "38" not in declined
    assert again == approved


def test_each_library_is_closed_on_the_other_ones_listener(daemon: RunningDaemon) -> None:
    # The JavaScript default (binary bitmap) on the ascii listener is closed at once, and said why.
    with pytest.raises(AssertionError, match="link closed by the processor"):
        js_exchange(daemon.ports["network"], [echo(next_stan())])
    assert "likely cause: binary bitmap on an ascii listener" in daemon.stderr()
