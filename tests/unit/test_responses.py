"""Response fields built in wire/: what an approval and a balance inquiry add."""

import pytest

from processor.wire.responses import approved_fields, balances, reply_fields


@pytest.mark.parametrize(
    ("code", "billing", "expected"),
    [
        ("00", None, {}),  # a full approval in the account's currency adds nothing but 38
        ("10", None, {"4": "000000000700"}),  # partial: field 4 is what was approved
        ("00", 1234, {"6": "000000001234", "51": "840"}),  # converted
        ("10", 1234, {"4": "000000000700", "6": "000000001234", "51": "840"}),
    ],
)
def test_approved_fields(code: str, billing: int | None, expected: dict[str, str]) -> None:
    assert approved_fields(code, 700, billing, "840") == expected


def test_reply_fields_echo_and_answer() -> None:
    echo = {"11": "000001", "3": "000000"}
    assert reply_fields(echo, "0421", "00") == {
        "11": "000001",
        "3": "000000",
        "t": "0430",
        "39": "00",
    }
    assert echo == {"11": "000001", "3": "000000"}  # the request's echo set is not changed


def test_balances_is_ledger_then_available() -> None:
    assert balances("00", "978", 12345, -500) == ("0001978C000000012345" + "0002978D000000000500")
