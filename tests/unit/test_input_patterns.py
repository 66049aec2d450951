"""Every pattern an input is checked against ends at the end of the value.

msgspec matches a pattern with re.search, and Python's `$` also matches before a final
newline: "000001\n" passed ^[0-9]{6}$. A clearing record's STAN with one missed its hold and
was debited again; a load file's MCC with one wrote a card no later read could decode.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import msgspec
import pytest

from processor import clearing, config
from processor.api import views
from processor.clearing import InvalidRecord, parse_record
from processor.ledger.load import LoadError, LoadFile, parse_load_file

MAIN = "5200001111222233"
RECORD: dict[str, str | int] = {
    "record_id": "clr-1",
    "type": "purchase",
    "pan": MAIN,
    "acquirer": "123456",
    "stan": "000001",
    "transmission_datetime": "1124120000",
    "amount": 1_000,
    "currency": "EUR",
    "rrn": "633012000001",
    "original_mti": "0100",
}


def patterns(kind: Any) -> set[str]:
    """Every string pattern in the type, through Structs, containers and unions."""
    found: set[str] = set()
    seen: set[int] = set()

    def walk(info: msgspec.inspect.Type) -> None:
        if id(info) in seen:
            return
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.StrType) and info.pattern is not None:
            found.add(info.pattern)
        for value in vars(info).values() if hasattr(info, "__dict__") else ():
            walk_value(value)
        for name in getattr(type(info), "__struct_fields__", ()):
            walk_value(getattr(info, name))

    def walk_value(value: object) -> None:
        if isinstance(value, msgspec.inspect.Type):
            walk(value)
        elif isinstance(value, msgspec.inspect.Field):
            walk(value.type)
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk_value(item)

    walk(msgspec.inspect.type_info(kind))
    return found


INPUTS = [
    clearing.ClearingRecord,
    LoadFile,
    config.Config,
    *(
        kind
        for _, kind in inspect.getmembers(views, inspect.isclass)
        if issubclass(kind, msgspec.Struct) and kind.__module__ == views.__name__
    ),
]


@pytest.mark.parametrize("kind", INPUTS, ids=lambda kind: kind.__name__)
def test_no_pattern_ends_with_a_dollar(kind: Any) -> None:
    found = patterns(kind)
    assert not [pattern for pattern in found if pattern.endswith("$")], found


def test_the_walk_finds_the_patterns_it_checks() -> None:
    # A walk that found nothing would pass the test above for every type.
    assert r"^[0-9]{6}\Z" in patterns(clearing.ClearingRecord)
    assert any("13,19" in pattern for pattern in patterns(LoadFile))


@pytest.mark.parametrize("field", [k for k, v in RECORD.items() if isinstance(v, str)])
def test_a_clearing_field_ending_in_a_newline_is_an_invalid_record(field: str) -> None:
    parse_record(json.dumps(RECORD).encode())  # valid as it is
    spoilt = dict(RECORD, **{field: f"{RECORD[field]}\n"})
    with pytest.raises(InvalidRecord, match=field):
        parse_record(json.dumps(spoilt).encode())


@pytest.mark.parametrize(
    ("account", "card"),
    [
        ('id = "acct-main\\n"', ""),
        ("", 'blocked_mccs = ["5411\\n"]'),
        ("", 'expiry = "2812\\n"'),
        ("", 'pan = "5200001111222233\\n"'),
        ('currency = "EUR\\n"', ""),
    ],
)
def test_a_load_file_value_ending_in_a_newline_names_its_field(account: str, card: str) -> None:
    def toml(account_line: str, card_line: str) -> bytes:
        account_fields = {"id": '"acct-main"', "currency": '"EUR"', "balance": "100"}
        card_fields = {"pan": f'"{MAIN}"', "account": '"acct-main"', "expiry": '"2812"'}
        for fields, line in ((account_fields, account_line), (card_fields, card_line)):
            if line:
                key, value = line.split(" = ", 1)
                fields[key] = value
        rendered = "[[accounts]]\n" + "".join(f"{k} = {v}\n" for k, v in account_fields.items())
        rendered += "[[cards]]\n" + "".join(f"{k} = {v}\n" for k, v in card_fields.items())
        return rendered.encode()

    parse_load_file(toml("", ""), "cards.toml")  # valid as it is
    key = (account or card).split(" = ", 1)[0]
    with pytest.raises(LoadError, match=key):
        parse_load_file(toml(account, card), "cards.toml")
