"""The simulator's link client: every answer checked against the wire contract, and a link
that fails reported at once, not after a timeout per request."""

from __future__ import annotations

import asyncio
import time

import pytest
from sim_fakes import FakeIssuer

from processor.sim.client import BadAnswer, LinkDown, WireClient, check_answer

PAN = "4761739001010010"


def request(**fields: str) -> dict[str, str]:
    values = {
        "t": "0100",
        "2": PAN,
        "3": "000000",
        "4": "000000001000",
        "7": "1124120000",
        "11": "000123",
        "18": "5411",
        "32": "123456",
        "37": "123456789012",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
    }
    values.update(fields)
    return values


def answer_to(sent: dict[str, str], **fields: str) -> dict[str, str]:
    keys = ("2", "3", "4", "6", "7", "11", "12", "13", "32", "37", "41", "42", "49", "51", "70")
    answer = {k: sent[k] for k in keys if k in sent}
    answer["t"] = f"{sent['t'][:2]}{int(sent['t'][2]) + 1}0"
    answer.update(fields)
    return answer


def test_a_contract_answer_passes() -> None:
    sent = request()
    assert check_answer(sent, answer_to(sent, **{"39": "00", "38": "123456"})) == []
    assert check_answer(sent, answer_to(sent, **{"39": "51"})) == []
    reversal = request(t="0400", **{"90": "0" * 42})
    assert check_answer(reversal, answer_to(reversal, **{"39": "00", "90": "0" * 42})) == []
    echo = {"t": "0800", "7": "1124120000", "11": "000001", "70": "301"}
    assert check_answer(echo, answer_to(echo, **{"39": "00"})) == []


@pytest.mark.parametrize(
    ("sent_mti", "answer_mti"), [("0100", "0810"), ("0101", "0111"), ("0400", "0110")]
)
def test_the_answer_mti_is_the_requests(sent_mti: str, answer_mti: str) -> None:
    sent = request(t=sent_mti)
    answer = answer_to(sent, t=answer_mti, **{"39": "05"})
    assert any(f"MTI {answer_mti}" in problem for problem in check_answer(sent, answer))


@pytest.mark.parametrize("key", ["2", "3", "4", "7", "32", "37", "41", "42", "49"])
def test_the_echo_set_is_echoed(key: str) -> None:
    sent = request()
    answer = answer_to(sent, **{"39": "05", key: "9" * len(sent[key])})
    (problem,) = check_answer(sent, answer)
    assert f"field {key} not echoed" in problem
    assert PAN not in problem  # a card number is shown masked


def test_what_the_spec_lets_the_daemon_change() -> None:
    sent = request()
    partial = answer_to(sent, **{"39": "10", "38": "123456", "4": "000000000400"})
    assert check_answer(sent, partial) == []
    more = answer_to(sent, **{"39": "10", "38": "123456", "4": "000000002000"})
    assert check_answer(sent, more) != []
    # A format error leaves out the field at fault; what it echoes must still be the same.
    format_error = answer_to(sent, **{"39": "30"})
    del format_error["7"]
    assert check_answer(sent, format_error) == []


def test_an_approval_code_exactly_when_approved() -> None:
    sent = request()
    assert check_answer(sent, answer_to(sent, **{"39": "00"})) == [
        "39 = 00 without a 6-character approval code (38)"
    ]
    assert check_answer(sent, answer_to(sent, **{"39": "05", "38": "123456"})) == [
        "approval code (38) on a 39 = 05 answer"
    ]
    inquiry = request(**{"3": "310000"})  # an approval carries its code, an inquiry's too
    assert check_answer(inquiry, answer_to(inquiry, **{"39": "00", "38": "123456"})) == []
    assert check_answer(inquiry, answer_to(inquiry, **{"39": "00"})) == [
        "39 = 00 without a 6-character approval code (38)"
    ]


async def _client(issuer: FakeIssuer) -> WireClient:
    return await WireClient.connect("127.0.0.1", await issuer.start())


def test_a_second_answer_fails_the_next_exchange() -> None:
    async def main() -> None:
        issuer = FakeIssuer(duplicate=True)
        client = await _client(issuer)
        with pytest.raises(BadAnswer, match="a second answer: 0110 STAN 000123"):
            await client.exchange(request())
        await client.close()
        await issuer.stop()

    asyncio.run(main())


def test_an_answer_nobody_awaits_is_reported() -> None:
    async def main() -> None:
        issuer = FakeIssuer()
        client = await _client(issuer)
        await client.exchange(request())
        stray = request(**{"11": "000999"})
        client.send_raw(client.codec.encode(stray))  # not awaited: its answer is unsolicited
        await asyncio.sleep(0.2)
        assert client.take_unsolicited() == [
            "an answer no request awaits: 0110 STAN 000999 39 = 00"
        ]
        await client.close()
        await issuer.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("issuer", "error", "message"),
    [
        (FakeIssuer(close_at=1), LinkDown, "link closed by the processor"),
        (FakeIssuer(garbage=True), BadAnswer, "undecodable answer"),
    ],
)
def test_a_failed_link_fails_at_once(issuer: FakeIssuer, error: type, message: str) -> None:
    async def main() -> None:
        client = await _client(issuer)
        started = time.monotonic()
        with pytest.raises(error, match=message):
            await client.exchange(request())
        if error is LinkDown:  # and every request after it, with the cause
            with pytest.raises(LinkDown, match=message):
                await client.exchange(request(**{"11": "000124"}))
        else:  # the link itself still works
            with pytest.raises(BadAnswer, match=message):
                await client.exchange(request(**{"11": "000124"}))
        assert time.monotonic() - started < 1.0  # not the 5 s answer timeout
        await client.close()
        await issuer.stop()

    asyncio.run(main())


def test_what_the_daemon_may_change_in_an_echoed_field_is_not_a_mismatch() -> None:
    """Converted here (the network's field 51 not the account's), an approval and an advice's
    acknowledgement carry what was held in 6 and 51; a retransmission is replayed with the
    original's 12 and 13 (not matched). Each was reported as a field not echoed."""
    sent = request(**{"6": "000000000800", "51": "826", "12": "111111", "13": "1207"})
    converted = answer_to(sent, **{"39": "00", "38": "123456", "6": "000000000920", "51": "978"})
    assert check_answer(sent, converted) == []
    advice = {**sent, "t": "0120", "39": "00"}
    acknowledged = answer_to(advice, **{"39": "00", "6": "000000000920", "51": "978"})
    assert check_answer(advice, acknowledged) == []
    replayed = answer_to(sent, **{"39": "00", "38": "123456", "12": "101010"})
    assert check_answer(sent, replayed, repeat=True) == []
    assert check_answer(sent, replayed) != []  # not a repeat: 12 must be echoed
    assert check_answer(sent, answer_to(sent, **{"39": "00", "38": "123456", "51": "97"})) != []
    # Not converted (51 as sent), or not an approval: 6 must be echoed as ever.
    changed = answer_to(sent, **{"39": "00", "38": "123456", "6": "000000999999"})
    assert check_answer(sent, changed) != []
    declined = answer_to(sent, **{"39": "51", "6": "000000000920", "51": "978"})
    assert check_answer(sent, declined) != []
    partial = request(**{"6": "000000000800", "51": "978", "49": "978"})
    above = answer_to(partial, **{"39": "10", "38": "123456", "6": "000000000900"})
    assert check_answer(partial, above) != []  # a partial approval above what was asked


def test_a_converted_purchase_answer_is_no_mismatch() -> None:
    # An 0200 is decided and answered as an 0100 is: converted, its 6 and 51 are what posted.
    sent = request(t="0200", **{"6": "000000000800", "51": "826"})
    answer = answer_to(sent, **{"39": "00", "38": "123456", "6": "000000000920", "51": "978"})
    assert check_answer(sent, answer) == []
