"""The outbox's two record forms (processor.ledger.records.EventCodec): every event reads back
exactly as it was appended, whichever form it was stored in, and a message's event takes the
compact one."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from processor.ledger.records import (
    COMPACT_EVENT_MARK,
    MESSAGE_EVENT_TYPES,
    EventCodec,
    OutboxRecord,
)

CODEC = EventCodec()
small_text = st.text(min_size=1, max_size=40)
maybe_text = st.none() | small_text
maybe_int = st.none() | st.integers(min_value=-(10**15), max_value=10**15)
event_types = st.sampled_from([*MESSAGE_EVENT_TYPES, "account.funded", "card.status_changed"])


@st.composite
def outbox_records(draw: st.DrawFn) -> OutboxRecord:
    """Any record the ledger may append: a message's event (with or without fields the compact
    form has no slot for) or the event of a change that is no message's."""
    in_answer = draw(st.booleans())
    record = OutboxRecord(
        sequence=draw(st.integers(min_value=1, max_value=2**63)),
        type=draw(event_types),
        created_ms=draw(st.integers(min_value=0, max_value=2**50)),
        account_id=draw(maybe_text),
        account_sequence=draw(st.integers(min_value=0, max_value=2**40)),
        answer_key=draw(small_text if in_answer else maybe_text),
        amount=draw(maybe_int),
        mcc=draw(st.none() | st.from_regex(r"\A[0-9]{4}\Z")),
        merchant_name_location=draw(maybe_text),
        masked_pan=draw(maybe_text),
        posted_after=draw(maybe_int),
        held_after=draw(maybe_int),
        credit_limit=draw(maybe_int),
        account_currency=draw(st.none() | st.sampled_from(["EUR", "USD"])),
        cvc2=draw(st.none() | st.sampled_from(["match", "mismatch"])),
        in_answer=in_answer,
    )
    if draw(st.booleans()):  # a fact the compact form has no slot for
        record.reason = draw(small_text)
    if draw(st.booleans()):
        record.hold_id = draw(st.integers(min_value=1, max_value=2**40))
    return record


@given(outbox_records())
def test_every_event_reads_back_as_it_was_appended(record: OutboxRecord) -> None:
    raw = CODEC.encode(record)
    assert CODEC.decode(record.sequence, raw) == record
    assert CODEC.decode(record.sequence, memoryview(raw)) == record  # as LMDB may hand it out
    assert CODEC.created_ms(raw) == record.created_ms


@given(outbox_records())
def test_the_compact_form_is_taken_exactly_when_it_says_everything(record: OutboxRecord) -> None:
    raw = CODEC.encode(record)
    fits = (
        record.in_answer
        and record.type in MESSAGE_EVENT_TYPES
        and record.reason == ""
        and record.hold_id is None
    )
    assert raw.startswith(COMPACT_EVENT_MARK) == fits
    if fits:
        assert len(raw) < len(msgspec.msgpack.encode(record))
    else:
        assert raw == msgspec.msgpack.encode(record)  # the schema-5 form, unchanged


def test_an_approvals_event_is_about_45_bytes_smaller() -> None:
    record = OutboxRecord(
        sequence=2024,
        type="authorization.approved",
        created_ms=1795521606000,
        account_id="bench-157",
        account_sequence=2,
        answer_key="0100|400468|109056|1124120004",
        mcc="5411",
        merchant_name_location="DEMO SHOP                BERLIN       DE",
        posted_after=100000000000000,
        held_after=100,
        credit_limit=0,
        account_currency="EUR",
        in_answer=True,
    )
    full, compact = len(msgspec.msgpack.encode(record)), len(CODEC.encode(record))
    assert full - compact >= 40, (full, compact)


def test_a_type_position_past_the_table_is_a_decode_error_not_another_type() -> None:
    import pytest

    for position in (len(MESSAGE_EVENT_TYPES), -1):
        raw = COMPACT_EVENT_MARK + msgspec.msgpack.encode([position, 1, "0100|1|000001|1"])
        with pytest.raises(msgspec.DecodeError):
            CODEC.decode(7, raw)
