"""Helpers the unit tests share: an ISO 8583 0100 as the codec reads it, a demo ledger."""

from __future__ import annotations

from pathlib import Path

from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

CODEC = Codec(load_spec())

# Loading the demo data is a change with events: its programme controls, the creation of its
# four accounts and twenty cards, and the funding of the accounts. A test's own events follow.
DEMO_LOAD_EVENTS = 29


def authorization(pan: str, stan: str, amount: int = 100, **fields: str) -> AuthorizationRequest:
    """A purchase 0100 in EUR at a grocery, through the codec (encoded, then decoded);
    `fields` add or replace fields by number."""
    values = {
        "t": "0100",
        "2": pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1124120000",
        "11": stan,
        "18": "5411",
        "32": "123456",
        "49": "978",
        **fields,
    }
    request = CODEC.decode(CODEC.encode(values))
    assert isinstance(request, AuthorizationRequest)
    return request


def demo_ledger(directory: Path, hasher: PanHasher) -> Ledger:
    """A ledger holding the demo data (processor/data/demo.toml), durability process."""
    ledger = Ledger(directory, durability="process", map_size_bytes=64 << 20)
    load_path(ledger, demo_data_path(), hasher)
    return ledger
