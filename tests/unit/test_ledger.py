"""The LMDB ledger: load files, PAN protection, reports, and the Authorizer that applies batches.

Every test works on a fresh ledger in tmp_path with durability="process" (no fsync).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import lmdb
import msgspec
import pytest

from processor.authorizer import Authorizer, Outcome
from processor.catalog import default_catalog
from processor.engine import ProgrammeRules
from processor.engine.controls import periods_at, used
from processor.ledger.controls import AmountLimit, Controls
from processor.ledger.load import (
    LoadError,
    LoadSummary,
    apply_load_file,
    card_id_for,
    load_path,
    parse_load_file,
)
from processor.ledger.records import Card
from processor.ledger.report import describe_account, describe_card, money
from processor.ledger.store import Ledger, LedgerError
from processor.resources import demo_data_path
from processor.security import PanHasher, luhn_valid, mask_pan
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

HASHER = PanHasher(b"test-key")
CODEC = Codec(load_spec())
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
MAP_SIZE = 64 << 20
HOLD_LIFETIME_SECONDS = 7 * 86400

MAIN = "5200001111222233"  # acct-main, per-authorisation limit 500.00, MCC 5933 blocked
FROZEN = "5200001111222241"  # acct-main, frozen
CREDIT = "5200001111222258"  # acct-credit (20.00 + 30.00 credit), expires November 2026
YEN = "520000111122227772"  # acct-yen, 18 digits
UNKNOWN = "5200001111222266"  # Luhn-valid, never loaded
PANS = (MAIN, FROZEN, CREDIT, YEN)

LOAD_FILE = f"""
[[accounts]]
id = "acct-main"
currency = "EUR"
balance = 100000
credit_limit = 0

[[accounts]]
id = "acct-credit"
currency = "EUR"
balance = 2000
credit_limit = 3000

[[accounts]]
id = "acct-yen"
currency = "JPY"
balance = 50000

[[cards]]
pan = "{MAIN}"
account = "acct-main"
expiry = "3012"
per_transaction_limit = 50000
blocked_mccs = ["5933"]

[[cards]]
pan = "{FROZEN}"
account = "acct-main"
expiry = "3012"
status = "frozen"

[[cards]]
pan = "{CREDIT}"
account = "acct-credit"
expiry = "2611"

[[cards]]
pan = "{YEN}"
account = "acct-yen"
expiry = "3012"
""".encode()


# --- helpers ------------------------------------------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    yield led
    led.close()


@pytest.fixture
def loaded(ledger: Ledger) -> Ledger:
    apply_load_file(ledger, parse_load_file(LOAD_FILE, "test.toml"), HASHER, "test.toml")
    return ledger


@pytest.fixture
def authorizer(loaded: Ledger) -> Authorizer:
    return make_authorizer(loaded)


def make_authorizer(ledger: Ledger, rules: ProgrammeRules | None = None) -> Authorizer:
    return Authorizer(
        ledger,
        HASHER,
        rules or ProgrammeRules(),
        hold_lifetime_seconds=HOLD_LIFETIME_SECONDS,
    )


def load_text(ledger: Ledger, text: bytes) -> LoadSummary:
    return apply_load_file(ledger, parse_load_file(text, "extra.toml"), HASHER, "extra.toml")


def auth_request(
    pan: str = MAIN,
    amount: int | None = 1_000,
    *,
    stan: str = "000001",
    transmission: str = "1124120000",
    acquirer: str = "123456",
    mti: str = "0100",
    processing_code: str = "000000",
    currency: str = "978",
    mcc: str = "5411",
    rrn: str = "633012000001",
    expiry: str | None = None,
) -> AuthorizationRequest:
    """A request as the wire decodes it: encoded, then decoded by the real codec."""
    fields = {
        "t": mti,
        "2": pan,
        "3": processing_code,
        "7": transmission,
        "11": stan,
        "18": mcc,
        "22": "051",
        "25": "00",
        "32": acquirer,
        "37": rrn,
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "TEST SHOP              BERLIN         DE",
        "49": currency,
    }
    if amount is not None:
        fields["4"] = f"{amount:012d}"
    if expiry is not None:
        fields["14"] = expiry
    request = CODEC.decode(CODEC.encode(fields))
    assert isinstance(request, AuthorizationRequest)
    return request


def response_fields(outcome: Outcome) -> dict[str, str]:
    fields = outcome.fields
    return fields


def card_of(ledger: Ledger, pan: str) -> Card | None:
    with ledger.read() as reader:
        return reader.card(HASHER.card_key(pan))


def account_state(ledger: Ledger, account_id: str) -> tuple[int, int, int]:
    """(posted, held, available)"""
    with ledger.read() as reader:
        account = reader.account(account_id)
        assert account is not None
        return account.posted, account.held, account.available


def open_holds(ledger: Ledger, account_id: str) -> list[Any]:
    with ledger.read() as reader:
        return reader.account_holds(account_id, limit=10_000)


def card_count(ledger: Ledger) -> int:
    with ledger.read() as reader:
        return sum(len(reader.account_cards(a.id)) for a in reader.accounts())


# --- load files -----------------------------------------------------------------------------------


def test_test_pans_are_luhn_valid() -> None:
    assert all(luhn_valid(pan) for pan in (*PANS, UNKNOWN))


def test_load_creates_accounts_and_cards(ledger: Ledger) -> None:
    data = parse_load_file(LOAD_FILE, "test.toml")
    assert [a.id for a in data.accounts] == ["acct-main", "acct-credit", "acct-yen"]
    assert len(data.cards) == 4

    summary = apply_load_file(ledger, data, HASHER, "test.toml", now_ms=1_796_000_000_000)

    assert summary == LoadSummary(
        accounts_created=3, accounts_updated=0, cards_created=4, cards_updated=0
    )
    with ledger.read() as reader:
        assert reader.account_count() == 3
        main = reader.account("acct-main")
        assert main is not None
        assert (main.currency, main.posted, main.held, main.credit_limit, main.status) == (
            "EUR",
            100000,
            0,
            0,
            "active",
        )
        credit = reader.account("acct-credit")
        assert credit is not None and credit.available == 5000
        key = HASHER.card_key(MAIN)
        card = reader.card(key)
        assert card == Card(
            card_id=card_id_for(key),
            account_id="acct-main",
            bin="520000",
            last4="2233",
            pan_length=16,
            expiry="3012",
            status="active",
            # The load file's shorthand keys are folded into the card's controls; the legacy
            # record fields stay empty (decide() no longer reads them).
            controls=Controls(
                amount_limits=(
                    AmountLimit(interval="per_authorization", amount=50000, currency="EUR"),
                ),
                blocked_mccs=("5933",),
            ),
            created_ms=1_796_000_000_000,
        )
        assert {c.card_id for c in reader.account_cards("acct-main")} == {
            card_id_for(HASHER.card_key(MAIN)),
            card_id_for(HASHER.card_key(FROZEN)),
        }
        yen = reader.card(HASHER.card_key(YEN))
        assert yen is not None and yen.pan_length == 18 and yen.account_id == "acct-yen"
        assert reader.card(HASHER.card_key(UNKNOWN)) is None


def test_cards_are_keyed_by_the_hasher_key(loaded: Ledger) -> None:
    with loaded.read() as reader:
        assert reader.card(PanHasher(b"another-key").card_key(MAIN)) is None


def test_loading_the_same_file_twice_doubles_nothing(loaded: Ledger) -> None:
    def snapshot() -> tuple[Any, ...]:
        with loaded.read() as reader:
            accounts = sorted(msgspec.to_builtins(a) for a in reader.accounts())
            index = {
                a.id: sorted(c.card_id for c in reader.account_cards(a.id))
                for a in reader.accounts()
            }
            return accounts, index, reader.account_count()

    before = snapshot()
    summary = load_text(loaded, LOAD_FILE)

    assert summary == LoadSummary(
        accounts_created=0, accounts_updated=3, cards_created=0, cards_updated=4
    )
    assert snapshot() == before
    assert card_count(loaded) == 4


def test_reload_keeps_held_from_open_holds_not_from_the_file(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 2_500)], NOW)
    assert outcome.response_code == "00"

    load_text(loaded, LOAD_FILE.replace(b"balance = 100000", b"balance = 90000"))

    assert account_state(loaded, "acct-main") == (90000, 2_500, 87_500)
    assert len(open_holds(loaded, "acct-main")) == 1


def test_updating_a_cards_account_moves_it(loaded: Ledger) -> None:
    moved = f"""
[[cards]]
pan = "{MAIN}"
account = "acct-credit"
expiry = "3101"
status = "frozen"
""".encode()
    summary = load_text(loaded, moved)

    assert summary.cards_updated == 1 and summary.cards_created == 0
    card = card_of(loaded, MAIN)
    assert card is not None
    assert (card.account_id, card.expiry, card.status) == ("acct-credit", "3101", "frozen")
    # Fields the file leaves out go back to their defaults: a load entry is the whole card.
    assert card.controls is None
    assert card.per_transaction_limit is None and card.blocked_mccs == ()
    with loaded.read() as reader:
        assert [c.last4 for c in reader.account_cards("acct-main")] == ["2241"]
        assert sorted(c.last4 for c in reader.account_cards("acct-credit")) == ["2233", "2258"]
    assert card_count(loaded) == 4


def load_events(ledger: Ledger, first: int = 1) -> list[tuple[str, str | None, str, int | None]]:
    """(type, account, reason, amount) of every event from `first` on."""
    with ledger.read() as reader:
        records = reader.outbox(first, 1000)
    return [(r.type, r.account_id, r.reason, r.amount) for r in records]


def events_made(ledger: Ledger) -> int:
    with ledger.read() as reader:
        return reader.outbox_last_sequence()


def test_a_load_funds_new_accounts_by_entries_with_their_events(ledger: Ledger) -> None:
    apply_load_file(ledger, parse_load_file(LOAD_FILE, "t.toml"), HASHER, "t.toml", now_ms=7_000)

    # One entry and one event per balance, after its account's creation; then the cards'
    # creations (as through the API: the programme learns of every account and card).
    assert load_events(ledger) == [
        ("account.created", "acct-main", "load_account", None),
        ("account.funded", "acct-main", "load_fund", 100_000),
        ("account.created", "acct-credit", "load_account", None),
        ("account.funded", "acct-credit", "load_fund", 2_000),
        ("account.created", "acct-yen", "load_account", None),
        ("account.funded", "acct-yen", "load_fund", 50_000),
        ("card.created", "acct-main", "load_card", None),
        ("card.created", "acct-main", "load_card", None),
        ("card.created", "acct-credit", "load_card", None),
        ("card.created", "acct-yen", "load_card", None),
    ]
    with ledger.read() as reader:
        [entry] = reader.entries("acct-main", 10)
        [event] = reader.outbox(2, 1)
        main = reader.account("acct-main")
        cards = {record.card_id for record in reader.outbox(7, 4)}
    assert len(cards) == 4 and None not in cards
    assert (entry.kind, entry.amount, entry.reason, entry.posted_after, entry.created_ms) == (
        "fund",
        100_000,
        "load_fund",
        100_000,
        7_000,
    )
    assert event.entry_sequence == entry.sequence and event.posted_after == 100_000
    assert main is not None and (main.event_sequence, main.created_ms) == (4, 7_000)


def test_a_load_moves_a_changed_balance_by_the_difference(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 2_500)], NOW)
    assert outcome.response_code == "00"
    seen = events_made(loaded)

    load_text(loaded, LOAD_FILE.replace(b"balance = 100000", b"balance = 90000"))
    load_text(loaded, LOAD_FILE.replace(b"balance = 100000", b"balance = 90000"))  # no change

    assert load_events(loaded, seen + 1) == [("account.debited", "acct-main", "load_debit", 10_000)]
    with loaded.read() as reader:
        newest = reader.entries("acct-main", 10)[0]
        [event] = reader.outbox(seen + 1, 1)
    assert (newest.kind, newest.amount, newest.posted_after) == ("debit", 10_000, 90_000)
    assert (event.posted_after, event.held_after) == (90_000, 2_500)


def test_a_new_account_loaded_overdrawn_is_debited(ledger: Ledger) -> None:
    text = b'[[accounts]]\nid = "owing"\ncurrency = "EUR"\nbalance = -300\ncredit_limit = 500\n'
    load_text(ledger, text)

    assert load_events(ledger) == [
        ("account.created", "owing", "load_account", None),
        ("account.debited", "owing", "load_debit", 300),
    ]
    assert account_state(ledger, "owing") == (-300, 0, 200)


def test_a_load_that_changes_cards_and_controls_says_so(loaded: Ledger) -> None:
    seen = events_made(loaded)
    changed = (
        LOAD_FILE.replace(b'expiry = "2611"', b'expiry = "2611"\nstatus = "frozen"')
        .replace(b'blocked_mccs = ["5933"]', b'blocked_mccs = ["5933", "7995"]')
        .replace(
            b"balance = 50000",
            b'balance = 50000\ncontrols = { blocked_mccs = ["7995"] }',
        )
    )
    programme = b'[programme_controls]\nblocked_mccs = ["7995"]\n'

    load_text(loaded, changed)
    load_text(loaded, programme)
    load_text(loaded, programme)  # the same controls again: nothing changed, no event

    assert load_events(loaded, seen + 1) == [
        ("controls.updated", "acct-yen", "account_controls", None),
        ("controls.updated", "acct-main", "card_controls", None),
        ("card.status_changed", "acct-credit", "card_frozen", None),
        ("controls.updated", None, "programme_controls", None),
    ]
    with loaded.read() as reader:
        records = reader.outbox(seen + 1, 10)
    assert records[2].card_id == card_id_for(HASHER.card_key(CREDIT))
    assert records[2].masked_pan == mask_pan(CREDIT)


def test_a_load_that_changes_a_currency_moves_the_balance_out_and_in(loaded: Ledger) -> None:
    seen = events_made(loaded)
    load_text(
        loaded,
        LOAD_FILE.replace(b'currency = "JPY"\nbalance = 50000', b'currency = "EUR"\nbalance = 400'),
    )
    assert load_events(loaded, seen + 1) == [
        ("account.debited", "acct-yen", "load_debit", 50_000),  # in yen, before the change
        ("account.updated", "acct-yen", "currency_changed", None),
        ("account.funded", "acct-yen", "load_fund", 400),  # in euros, after it
    ]
    with loaded.read() as reader:
        records = reader.outbox(seen + 1, 3)
    assert [r.account_currency for r in records] == ["JPY", "EUR", "EUR"]
    assert [r.posted_after for r in records] == [0, 0, 400]


def test_a_currency_change_needs_its_cards_limits_anew_and_starts_usage_again(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """acct-main's card has a 500.00 EUR limit: re-loaded in JPY without the card, the limit
    was kept in EUR and skipped for good (5,000,000 JPY approved); the usage kept counting
    euros as yen."""
    [posted] = authorizer.authorize_batch([auth_request(mti="0200")], NOW)  # no hold
    assert posted.response_code == "00"
    in_yen = b'[[accounts]]\nid = "acct-main"\ncurrency = "JPY"\nbalance = 10000000\n'
    with pytest.raises(LoadError, match=r"has limits in EUR; give its controls in JPY"):
        load_text(loaded, in_yen)
    with loaded.read() as reader:
        account = reader.account("acct-main")
        assert account is not None and account.currency == "EUR"  # nothing changed
    cards = f'[[cards]]\npan = "{MAIN}"\naccount = "acct-main"\nexpiry = "3012"\n'.encode()
    frozen = f'[[cards]]\npan = "{FROZEN}"\naccount = "acct-main"\nexpiry = "3012"\n'.encode()
    load_text(loaded, in_yen + cards + frozen)  # the cards given anew: no limits now
    with loaded.read() as reader:
        account = reader.account("acct-main")
        assert account is not None and account.currency == "JPY" and account.usage is not None
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None
        usage = reader.card_state(card).usage
        assert usage is not None
        # Amounts (even places) start again in yen; counts (odd places) stay true.
        for row in (usage.counters[""], account.usage.counters[""]):
            assert row[0::2] == [0] * 5 and row[1::2] == [1] * 5


def test_a_card_moved_into_another_currency_starts_its_usage_again(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """900.00 EUR of usage moved with the card to a JPY account and was read as 90,000 JPY."""
    [posted] = authorizer.authorize_batch([auth_request(mti="0200")], NOW)
    assert posted.response_code == "00"
    with loaded.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None and reader.card_state(card).usage is not None
    load_text(
        loaded, f'[[cards]]\npan = "{MAIN}"\naccount = "acct-yen"\nexpiry = "3012"\n'.encode()
    )
    with loaded.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None and card.account_id == "acct-yen"
        usage = reader.card_state(card).usage
        assert usage is not None and usage.counters[""][0::2] == [0] * 5
        assert usage.counters[""][1::2] == [1] * 5  # its count stays


def test_a_card_moved_off_an_account_changing_currency_keeps_its_usage(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """acct-main goes to JPY in the file that moves its card to acct-credit (EUR): the card's
    usage was reset with the account's, though it never changed currency."""
    [posted] = authorizer.authorize_batch([auth_request(mti="0200")], NOW)
    assert posted.response_code == "00"
    text = (
        b'[[accounts]]\nid = "acct-main"\ncurrency = "JPY"\nbalance = 10\n'
        + f'[[cards]]\npan = "{MAIN}"\naccount = "acct-credit"\nexpiry = "3012"\n'.encode()
        + f'[[cards]]\npan = "{FROZEN}"\naccount = "acct-main"\nexpiry = "3012"\n'.encode()
    )
    load_text(loaded, text)
    with loaded.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None and card.account_id == "acct-credit"
        usage = reader.card_state(card).usage
        assert usage is not None and usage.counters[""][0] == 1_000


def test_a_currency_change_whose_cards_chunk_failed_leaves_no_old_amounts_on_a_retry(
    loaded: Ledger, authorizer: Authorizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accounts' chunk commits alone: when the cards' failed, a card the file moved was
    left on the re-currencied account with euros read as yen, and the retry, seeing yen
    already, never zeroed them."""
    from processor.ledger import load as load_module
    from processor.ledger.store import LedgerFull

    [posted] = authorizer.authorize_batch([auth_request(mti="0200")], NOW)
    assert posted.response_code == "00"
    text = (
        b'[[accounts]]\nid = "acct-main"\ncurrency = "JPY"\nbalance = 10\n'
        + f'[[cards]]\npan = "{MAIN}"\naccount = "acct-yen"\nexpiry = "3012"\n'.encode()
        + f'[[cards]]\npan = "{FROZEN}"\naccount = "acct-main"\nexpiry = "3012"\n'.encode()
    )
    real = load_module._put_cards

    def full_once(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(load_module, "_put_cards", real)
        raise LedgerFull("the map is full")

    monkeypatch.setattr(load_module, "_put_cards", full_once)
    with pytest.raises(LedgerFull):
        load_text(loaded, text)
    load_text(loaded, text)  # the retry
    with loaded.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None and card.account_id == "acct-yen"
        usage = reader.card_state(card).usage
        assert usage is not None and usage.counters[""][0::2] == [0] * 5


def test_a_stopped_cards_old_limits_do_not_block_a_currency_change(loaded: Ledger) -> None:
    """A closed card never authorises again: its limits in the old currency refused the
    change all the same."""
    closed = f'[[cards]]\npan = "{MAIN}"\naccount = "acct-main"\nexpiry = "3012"\n'
    closed += 'status = "closed"\nper_transaction_limit = 50000\n'
    load_text(loaded, closed.encode())
    load_text(loaded, b'[[accounts]]\nid = "acct-main"\ncurrency = "JPY"\nbalance = 10\n')
    with loaded.read() as reader:
        account = reader.account("acct-main")
        assert account is not None and account.currency == "JPY"


def test_a_load_that_changes_an_accounts_terms_says_which(loaded: Ledger) -> None:
    seen = events_made(loaded)
    load_text(
        loaded,
        LOAD_FILE.replace(b"credit_limit = 3000", b'credit_limit = 4000\nstatus = "frozen"'),
    )
    assert load_events(loaded, seen + 1) == [
        ("account.updated", "acct-credit", "credit_limit_changed", None),
        ("account.updated", "acct-credit", "account_frozen", None),
    ]


def test_a_card_moved_by_a_load_is_announced_to_both_accounts(loaded: Ledger) -> None:
    seen = events_made(loaded)
    moved = f'[[cards]]\npan = "{MAIN}"\naccount = "acct-credit"\nexpiry = "3101"\n'.encode()
    load_text(loaded, moved + b'per_transaction_limit = 50000\nblocked_mccs = ["5933"]\n')
    assert load_events(loaded, seen + 1) == [
        ("card.updated", "acct-main", "card_moved_out", None),
        ("card.updated", "acct-credit", "card_moved_in", None),
        ("card.updated", "acct-credit", "expiry_changed", None),
    ]


def test_empty_controls_are_kept_as_none_the_way_the_api_keeps_them(loaded: Ledger) -> None:
    load_text(loaded, LOAD_FILE.replace(b"balance = 50000", b"balance = 50000\ncontrols = {}"))
    seen = events_made(loaded)
    with loaded.read() as reader:
        yen = reader.account("acct-yen")
    assert yen is not None and yen.controls is None
    load_text(loaded, LOAD_FILE)  # no controls: the same as {}, nothing changed, no event
    assert events_made(loaded) == seen


def test_load_path_loads_the_demo_data(ledger: Ledger) -> None:
    summary = load_path(ledger, demo_data_path(), HASHER)

    assert summary == LoadSummary(
        accounts_created=4, accounts_updated=0, cards_created=20, cards_updated=0
    )
    card = card_of(ledger, "4761739001010010")
    assert card is not None and card.account_id == "demo-main"
    assert card.controls == Controls(
        amount_limits=(AmountLimit(interval="per_authorization", amount=500000, currency="EUR"),),
        blocked_mccs=("5933",),
    )
    with ledger.read() as reader:
        assert reader.programme_controls() == Controls(blocked_categories=("gambling",))


def test_load_path_of_a_missing_file(ledger: Ledger, tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"nowhere\.toml: cannot read"):
        load_path(ledger, tmp_path / "nowhere.toml", HASHER)


def test_load_path_reads_a_file(ledger: Ledger, tmp_path: Path) -> None:
    path = tmp_path / "cards.toml"
    path.write_bytes(LOAD_FILE)
    assert load_path(ledger, path, HASHER).cards_created == 4


ACCOUNT = b'[[accounts]]\nid = "a"\ncurrency = "EUR"\nbalance = 100\n'


def card_entry(pan: str, extra: str = "") -> bytes:
    return f'[[cards]]\npan = "{pan}"\naccount = "a"\nexpiry = "3012"\n{extra}'.encode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            ACCOUNT + card_entry("52000011112222x3"),
            "Expected `str` matching regex '^[0-9]{13,19}$' - at `$.cards[0].pan`",
            id="pan-not-digits",
        ),
        pytest.param(
            ACCOUNT + card_entry("52000011112"),
            "- at `$.cards[0].pan`",
            id="pan-too-short",
        ),
        pytest.param(
            ACCOUNT + card_entry(MAIN) + b"\n" + card_entry("52000011112222334444"),
            "- at `$.cards[1].pan`",
            id="second-pan-too-long",
        ),
        pytest.param(
            ACCOUNT + card_entry(MAIN, 'colour = "red"\n'),
            "Object contains unknown field `colour` - at `$.cards[0]`",
            id="unknown-card-key",
        ),
        pytest.param(
            ACCOUNT + b"overdraft = 5\n",
            "Object contains unknown field `overdraft` - at `$.accounts[0]`",
            id="unknown-account-key",
        ),
        pytest.param(
            b'[[merchants]]\nid = "m"\n',
            "Object contains unknown field `merchants`",
            id="unknown-top-level-key",
        ),
        pytest.param(
            ACCOUNT.replace(b"EUR", b"ABC"),
            "$.accounts[0].currency: currency 'ABC' is not an ISO 4217 alphabetic code",
            id="unknown-currency",
        ),
        pytest.param(
            ACCOUNT.replace(b"EUR", b"eur"),
            "- at `$.accounts[0].currency`",
            id="lowercase-currency",
        ),
        pytest.param(
            ACCOUNT + card_entry(MAIN).replace(b"3012", b"3013"),
            "- at `$.cards[0].expiry`",
            id="expiry-month-13",
        ),
        pytest.param(
            ACCOUNT + card_entry(MAIN, 'status = "misplaced"\n'),
            "- at `$.cards[0].status`",
            id="bad-card-status",
        ),
        pytest.param(
            ACCOUNT + card_entry(MAIN, 'blocked_mccs = ["59"]\n'),
            "- at `$.cards[0].blocked_mccs[0]`",
            id="bad-mcc",
        ),
        pytest.param(
            ACCOUNT + card_entry(MAIN, "per_transaction_limit = -1\n"),
            "Expected `int` >= 0 - at `$.cards[0].per_transaction_limit`",
            id="negative-limit",
        ),
        pytest.param(
            ACCOUNT.replace(b"balance = 100", b"balance = 100\ncredit_limit = -5"),
            "Expected `int` >= 0 - at `$.accounts[0].credit_limit`",
            id="negative-credit-limit",
        ),
        pytest.param(
            ACCOUNT.replace(b'id = "a"', b'id = "a b"'),
            "- at `$.accounts[0].id`",
            id="account-id-with-space",
        ),
        pytest.param(
            ACCOUNT.replace(b'currency = "EUR"\n', b""),
            "Object missing required field `currency` - at `$.accounts[0]`",
            id="missing-currency",
        ),
        pytest.param(b"accounts = [", "not valid TOML", id="not-toml"),
    ],
)
def test_bad_load_files_name_the_field(text: bytes, expected: str) -> None:
    with pytest.raises(LoadError) as raised:
        parse_load_file(text, "bad.toml")
    message = str(raised.value)
    assert message.startswith("bad.toml: ")
    assert expected in message


@pytest.mark.parametrize("currency", [b"XXX", b"XTS"])
def test_currency_without_minor_units_is_refused(currency: bytes) -> None:
    with pytest.raises(LoadError, match=r"\$\.accounts\[0\]\.currency"):
        parse_load_file(ACCOUNT.replace(b"EUR", currency), "bad.toml")


@pytest.mark.parametrize(
    "pan",
    [
        "5200001111222234",  # MAIN with the last digit changed
        "4761739001010011",
        "5200001111222",  # 13 digits
        "5200001111222233441",  # 19 digits
    ],
)
def test_non_luhn_pan_is_named_by_path_without_the_pan(pan: str) -> None:
    assert not luhn_valid(pan)
    text = ACCOUNT + card_entry(MAIN) + b"\n" + card_entry(pan)

    with pytest.raises(LoadError) as raised:
        parse_load_file(text, "bad.toml")

    message = str(raised.value)
    assert message == "bad.toml: $.cards[1].pan fails the Luhn check"
    assert pan not in message and pan[-4:] not in message


def test_a_new_account_id_holding_a_cards_number_is_refused_without_quoting_it(
    loaded: Ledger,
) -> None:
    """An account id is a key, shown in views and sent in events in clear: not the number of
    a card the file or the ledger has, grouped by any separator an id allows."""
    in_file = "5200001111222274"  # Luhn-valid, new to the ledger: a card of the same file
    for account_id, card in (
        (f"acct-{in_file}", in_file),
        (f"acct:{MAIN[:4]}.{MAIN[4:8]}_{MAIN[8:12]}:{MAIN[12:]}", in_file),  # the ledger's
    ):
        text = ACCOUNT + card_entry(card) + ACCOUNT.replace(b'"a"', f'"{account_id}"'.encode())
        with pytest.raises(LoadError) as raised:
            apply_load_file(loaded, parse_load_file(text, "bad.toml"), HASHER, "bad.toml")
        assert str(raised.value) == (
            "bad.toml: $.accounts[1].id: holds a card's number; account ids are kept and "
            "shown in clear"
        )
        assert in_file not in str(raised.value) and MAIN not in str(raised.value)
    # A customer number that passes the Luhn check, as a tenth of all numbers do, is no card.
    customer = "cust-4000056655665556"
    assert luhn_valid(customer[5:])
    text = ACCOUNT.replace(b'"a"', f'"{customer}"'.encode())
    apply_load_file(loaded, parse_load_file(text, "good.toml"), HASHER, "good.toml")
    with loaded.read() as reader:
        assert reader.account(customer) is not None


def test_pattern_error_does_not_echo_the_pan() -> None:
    pan = "52000011112222339999x"
    with pytest.raises(LoadError) as raised:
        parse_load_file(ACCOUNT + card_entry(pan), "bad.toml")
    assert "$.cards[0].pan" in str(raised.value)
    assert "5200001111" not in str(raised.value)


def test_card_for_a_missing_account_is_refused_and_nothing_is_applied(ledger: Ledger) -> None:
    text = ACCOUNT + card_entry(MAIN).replace(b'account = "a"', b'account = "nope"')
    data = parse_load_file(text, "bad.toml")  # parses: the account is checked against the ledger

    with pytest.raises(LoadError) as raised:
        apply_load_file(ledger, data, HASHER, "bad.toml")

    assert str(raised.value) == "bad.toml: $.cards[0].account: no account 'nope'"
    assert MAIN not in str(raised.value)
    # One transaction: the account loaded earlier in the same file is rolled back as well.
    with ledger.read() as reader:
        assert reader.account_count() == 0
        assert reader.card(HASHER.card_key(MAIN)) is None


def test_card_may_reference_an_account_loaded_earlier(loaded: Ledger) -> None:
    summary = load_text(
        loaded, card_entry(UNKNOWN).replace(b'account = "a"', b'account = "acct-yen"')
    )
    assert summary.cards_created == 1
    card = card_of(loaded, UNKNOWN)
    assert card is not None and card.account_id == "acct-yen"


def test_currency_of_an_account_with_open_holds_cannot_change(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 100)], NOW)
    assert outcome.response_code == "00"
    with pytest.raises(LoadError, match=r"\$\.accounts\[0\]\.currency: account acct-main"):
        load_text(loaded, LOAD_FILE.replace(b'currency = "EUR"', b'currency = "USD"', 1))
    assert account_state(loaded, "acct-main") == (100000, 100, 99900)


# --- PAN protection -----------------------------------------------------------------------------


def test_no_pan_in_the_ledger_file_after_loading(loaded: Ledger, tmp_path: Path) -> None:
    data = (tmp_path / "data.mdb").read_bytes()
    assert b"acct-main" in data and b"520000" in data  # the file really holds the records
    for pan in PANS:
        assert pan.encode("ascii") not in data
        assert pan[6:].encode("ascii") not in data  # not even the digits after the BIN


def test_no_pan_in_the_ledger_file_after_authorising(
    loaded: Ledger, authorizer: Authorizer, tmp_path: Path
) -> None:
    requests = [
        auth_request(MAIN, 1_000, stan="000001"),
        auth_request(CREDIT, 99_999, stan="000002"),  # declined 51
        auth_request(UNKNOWN, 1_000, stan="000003"),  # declined 14
        auth_request(YEN, None, stan="000004", processing_code="310000", currency="392"),
    ]
    outcomes = authorizer.authorize_batch(requests, NOW)
    assert [o.response_code for o in outcomes] == ["00", "51", "14", "00"]
    authorizer.authorize_batch(requests, LATER)  # retransmissions

    data = (tmp_path / "data.mdb").read_bytes()
    assert b"TERM0001" in data  # the stored answers are in this file
    for pan in (*PANS, UNKNOWN):
        assert pan.encode("ascii") not in data


def test_bind_pan_key(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    try:
        ledger.bind_pan_key(HASHER.fingerprint)
        ledger.bind_pan_key(HASHER.fingerprint)  # the same key again is fine
        other = PanHasher(b"another-key")
        assert other.fingerprint != HASHER.fingerprint
        with pytest.raises(LedgerError, match="another PAN key"):
            ledger.bind_pan_key(other.fingerprint)
    finally:
        ledger.close()

    # The binding is durable: a reopened ledger refuses the other key too.
    reopened = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    try:
        with pytest.raises(LedgerError, match=other.fingerprint):
            reopened.bind_pan_key(other.fingerprint)
        reopened.bind_pan_key(HASHER.fingerprint)
    finally:
        reopened.close()


def test_readonly_ledger_can_read(tmp_path: Path) -> None:
    writable = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    load_text(writable, LOAD_FILE)
    writable.close()

    readonly = Ledger(tmp_path, readonly=True, map_size_bytes=MAP_SIZE)
    try:
        with readonly.read() as reader:
            assert reader.account_count() == 3
            account = reader.account("acct-credit")
            assert account is not None and account.available == 5000
            card = reader.card(HASHER.card_key(CREDIT))
            assert card is not None and card.expiry == "2611"
            assert len(reader.account_cards("acct-main")) == 2
        with pytest.raises(lmdb.ReadonlyError), readonly.write():
            pass
    finally:
        readonly.close()


def test_readonly_ledger_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="cannot open"):
        Ledger(tmp_path / "absent", readonly=True)
    assert not (tmp_path / "absent").exists()


def test_schema_version_mismatch_is_refused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    with ledger.env.begin(write=True) as txn:
        txn.put(b"schema", b"999", db=ledger._dbs["meta"])
    ledger.close()
    with pytest.raises(LedgerError, match="schema"):
        Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)


# --- reports ------------------------------------------------------------------------------------


def test_describe_account_masks_pans_and_lists_holds(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 1_234)], NOW)
    code = response_fields(outcome)["38"]

    with loaded.read() as reader:
        account = reader.account("acct-main")
        assert account is not None
        lines = describe_account(reader, account, NOW + timedelta(hours=2, minutes=3))
    text = "\n".join(lines)

    assert lines[0] == "account acct-main  status active  currency EUR"
    assert "posted" in lines[1] and lines[1].endswith("1000.00 EUR")
    assert lines[2].endswith("12.34 EUR")
    assert lines[4].endswith("987.66 EUR")
    assert "open holds: 1" in text
    assert (
        f"approval {code}" in text and "age 2h03m" in text and "expires 2026-12-01 12:00Z" in text
    )
    assert "cards: 2" in text
    assert "520000******2233" in text and "520000******2241" in text
    for pan in (MAIN, FROZEN):
        assert pan not in text
        assert pan[6:12] not in text  # the hidden middle digits


def card_for(pan: str) -> Card:
    return Card(
        card_id="card_x",
        account_id="a",
        bin=pan[:6],
        last4=pan[-4:],
        pan_length=len(pan),
        expiry="3012",
    )


@pytest.mark.parametrize("pan", [MAIN, YEN, "5200001111222", "5200001111222233444"])
def test_describe_card_shows_first_six_and_last_four_only(pan: str) -> None:
    card = card_for(pan)
    line = describe_card(card)
    assert card.masked_pan == mask_pan(pan)
    assert f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}" in line
    assert pan not in line
    assert line.endswith("controls none")


def test_short_pan_is_masked_like_mask_pan() -> None:
    pan = "520000111122"
    assert card_for(pan).masked_pan == mask_pan(pan) == "************"


def test_load_file_refuses_pans_shorter_than_13_digits() -> None:
    with pytest.raises(LoadError, match=r"\$\.cards\[0\]\.pan"):
        parse_load_file(ACCOUNT + card_entry("520000111122"), "short.toml")


@pytest.mark.parametrize(
    ("amount", "currency", "expected"),
    [
        (123456, "EUR", "1234.56 EUR"),
        (5, "EUR", "0.05 EUR"),
        (0, "EUR", "0.00 EUR"),
        (-5, "EUR", "-0.05 EUR"),
        (-123456, "EUR", "-1234.56 EUR"),
        (-100, "EUR", "-1.00 EUR"),
        (500, "JPY", "500 JPY"),
        (-500, "JPY", "-500 JPY"),
        (0, "JPY", "0 JPY"),
        (1234, "BHD", "1.234 BHD"),
        (1, "BHD", "0.001 BHD"),
        (-1, "BHD", "-0.001 BHD"),
        (-1005, "BHD", "-1.005 BHD"),
        (10**15, "USD", "10000000000000.00 USD"),
    ],
)
def test_money(amount: int, currency: str, expected: str) -> None:
    assert money(amount, currency) == expected


# --- the Authorizer on the ledger ------------------------------------------------------------


def test_approval_creates_a_hold(loaded: Ledger, authorizer: Authorizer) -> None:
    request = auth_request(MAIN, 2_500)

    [outcome] = authorizer.authorize_batch([request], NOW)

    assert (outcome.mti, outcome.response_code, outcome.reason) == ("0100", "00", "approved")
    fields = response_fields(outcome)
    assert fields["t"] == "0110" and fields["39"] == "00"
    assert len(fields["38"]) == 6
    for key in ("2", "3", "4", "7", "11", "32", "37", "41", "42", "49"):
        assert fields[key] == request.echo[key], key
    assert "54" not in fields
    assert account_state(loaded, "acct-main") == (100000, 2_500, 97_500)
    [hold] = open_holds(loaded, "acct-main")
    assert hold.amount == 2_500 and hold.currency == "EUR" and hold.status == "open"
    assert hold.approval_code == fields["38"] and fields["38"].isdigit()
    assert hold.identity == b"0100|" + request.identity == b"0100|123456|000001|1124120000"
    assert hold.card_id == card_id_for(HASHER.card_key(MAIN))
    assert (hold.mcc, hold.rrn) == ("5411", "633012000001")
    now_ms = int(NOW.timestamp() * 1000)
    assert hold.created_ms == now_ms
    assert hold.expires_ms == now_ms + HOLD_LIFETIME_SECONDS * 1000


def test_declines_hold_nothing(loaded: Ledger, authorizer: Authorizer) -> None:
    requests = [
        auth_request(MAIN, 50_001, stan="000001"),  # 61 over the per-authorisation limit
        auth_request(MAIN, 1_000, stan="000002", mcc="5933"),  # 57 blocked by the card
        auth_request(FROZEN, 1_000, stan="000003"),  # 62
        auth_request(UNKNOWN, 1_000, stan="000004"),  # 14
        auth_request(MAIN, None, stan="000005"),  # 13
        auth_request(MAIN, 1_000, stan="000006", currency="840"),  # 57: no USD->EUR rate
    ]
    outcomes = authorizer.authorize_batch(requests, NOW)

    assert [(o.response_code, o.reason) for o in outcomes] == [
        ("61", "per_authorization_amount_limit"),
        ("57", "mcc_blocked"),
        ("62", "card_frozen"),
        ("14", "card_not_found"),
        ("13", "invalid_amount"),
        ("57", "currency_not_supported"),
    ]
    for outcome in outcomes:
        assert "38" not in response_fields(outcome)
    assert account_state(loaded, "acct-main") == (100000, 0, 100000)
    assert open_holds(loaded, "acct-main") == []


def test_a_purchase_of_zero_is_an_account_verification(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """A merchant checking a card before it keeps it on file (or a wallet adding it) sends a
    purchase of zero: it was declined 13 invalid_amount. Now 85 (no reason to decline) once
    the card's checks pass, with nothing held or counted and no approval code; a frozen
    card is still 62."""
    before = account_state(loaded, "acct-main")
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 0)], NOW)
    assert (outcome.response_code, outcome.reason) == ("85", "account_verified")
    assert "38" not in response_fields(outcome)
    assert account_state(loaded, "acct-main") == before
    assert open_holds(loaded, "acct-main") == []
    with loaded.read() as reader:
        [event] = reader.outbox(reader.outbox_last_sequence(), 1)
    assert (event.type, event.reason, event.account_id) == (
        "authorization.approved",
        "account_verified",
        "acct-main",
    )
    [frozen] = authorizer.authorize_batch([auth_request(FROZEN, 0, stan="000002")], NOW)
    assert (frozen.response_code, frozen.reason) == ("62", "card_frozen")


def test_programme_controls_reach_the_decision(loaded: Ledger, authorizer: Authorizer) -> None:
    # CREDIT has no controls of its own: only the programme's can refuse it.
    [before] = authorizer.authorize_batch([auth_request(CREDIT, 100, mcc="7995")], NOW)
    assert before.response_code == "00"

    load_text(loaded, b'[programme_controls]\nblocked_mccs = ["7995"]\n')
    [outcome] = authorizer.authorize_batch(
        [auth_request(CREDIT, 100, mcc="7995", stan="000002")], NOW
    )
    assert (outcome.response_code, outcome.reason) == ("57", "mcc_blocked")


def test_programme_category_block_reaches_the_decision(loaded: Ledger) -> None:
    authorizer = make_authorizer(loaded, ProgrammeRules(catalog=default_catalog()))
    load_text(loaded, b'[programme_controls]\nblocked_categories = ["gambling"]\n')
    outcomes = authorizer.authorize_batch(
        [
            auth_request(CREDIT, 100, mcc="7995", stan="000001"),
            auth_request(CREDIT, 100, mcc="7801", stan="000002"),
            auth_request(CREDIT, 100, mcc="5411", stan="000003"),
        ],
        NOW,
    )
    assert [(o.response_code, o.reason) for o in outcomes] == [
        ("57", "mcc_category_blocked:gambling"),
        ("57", "mcc_category_blocked:gambling"),
        ("00", "approved"),
    ]


def test_load_file_without_programme_controls_leaves_them(loaded: Ledger) -> None:
    load_text(loaded, b'[programme_controls]\nblocked_mccs = ["7995"]\n')
    load_text(loaded, LOAD_FILE)  # no [programme_controls] table
    with loaded.read() as reader:
        assert reader.programme_controls() == Controls(blocked_mccs=("7995",))


def test_card_controls_table_and_shorthand_keys_are_merged(ledger: Ledger) -> None:
    text = ACCOUNT + card_entry(
        MAIN,
        'per_transaction_limit = 700\nblocked_mccs = ["5933", "7995"]\n'
        '[cards.controls]\nblocked_mccs = ["7995"]\n'
        '[[cards.controls.amount_limits]]\ninterval = "daily"\namount = 5000\n'
        'currency = "EUR"\n',
    )
    load_text(ledger, text)
    card = card_of(ledger, MAIN)
    assert card is not None
    assert card.controls == Controls(
        amount_limits=(
            AmountLimit(interval="daily", amount=5000, currency="EUR"),
            AmountLimit(interval="per_authorization", amount=700, currency="EUR"),
        ),
        blocked_mccs=("7995", "5933"),  # each MCC once
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            b'[programme_controls]\nblocked_categories = ["casinos"]\n',
            "$.programme_controls.blocked_categories[0]: unknown MCC category 'casinos'",
            id="unknown-programme-category",
        ),
        pytest.param(
            b'[programme_controls]\nallowed_countries = ["atlantis"]\n',
            "$.programme_controls.allowed_countries[0]: 'atlantis'",
            id="unknown-country-group",
        ),
        pytest.param(
            ACCOUNT + b"[accounts.controls]\n[[accounts.controls.amount_limits]]\n"
            b'interval = "daily"\namount = 100\ncurrency = "USD"\n',
            "$.accounts[0].controls.amount_limits[0].currency: 'USD' is not the account's "
            "currency 'EUR'",
            id="account-limit-in-another-currency",
        ),
        pytest.param(
            ACCOUNT
            + card_entry(
                MAIN,
                "[cards.controls]\n[[cards.controls.count_limits]]\ncount = 3\n"
                'categories = ["gambling", "spaceflight"]\ninterval = "daily"\n',
            ),
            "$.cards[0].controls.count_limits[0].categories[1]: unknown MCC category 'spaceflight'",
            id="unknown-limit-category",
        ),
    ],
)
def test_bad_controls_in_a_load_file_name_the_path(
    ledger: Ledger, text: bytes, expected: str
) -> None:
    with pytest.raises(LoadError) as raised:
        load_text(ledger, text)
    assert expected in str(raised.value)
    with ledger.read() as reader:  # nothing applied
        assert reader.account_count() == 0
        assert reader.programme_controls() is None


def test_unknown_card_answer_is_stored_without_card(loaded: Ledger, authorizer: Authorizer) -> None:
    request = auth_request(UNKNOWN, 1_000)
    [outcome] = authorizer.authorize_batch([request], NOW)
    assert outcome.response_code == "14"
    with loaded.read() as reader:
        stored = reader.answer(b"0100|" + request.identity)
    assert stored is not None
    assert (stored.response_code, stored.reason, stored.card_id, stored.hold_id) == (
        "14",
        "card_not_found",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("now", "code"),
    [
        (datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC), "00"),
        (datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC), "54"),
        # 00:30 on 1 December in UTC+1 is still 30 November in UTC: the card is valid.
        (datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), "00"),
        # 23:30 on 30 November in UTC-1 is already December in UTC.
        (datetime(2026, 11, 30, 23, 30, tzinfo=timezone(timedelta(hours=-1))), "54"),
    ],
)
def test_expiry_is_judged_in_utc(authorizer: Authorizer, now: datetime, code: str) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(CREDIT, 100)], now)
    assert outcome.response_code == code


def test_retransmission_in_a_later_batch_gets_identical_bytes(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    request = auth_request(MAIN, 2_500)
    [first] = authorizer.authorize_batch([request], NOW)
    assert first.reason == "approved"
    with loaded.read() as reader:
        stored_before = reader.answer(b"0100|" + request.identity)

    [again] = authorizer.authorize_batch([auth_request(MAIN, 2_500)], LATER)

    assert again.fields == first.fields
    assert (again.response_code, again.reason) == ("00", "retransmission")
    assert account_state(loaded, "acct-main") == (100000, 2_500, 97_500)
    assert len(open_holds(loaded, "acct-main")) == 1
    with loaded.read() as reader:
        assert reader.answer(b"0100|" + request.identity) == stored_before


def test_repeat_0101_gets_identical_bytes(loaded: Ledger, authorizer: Authorizer) -> None:
    [first] = authorizer.authorize_batch([auth_request(MAIN, 2_500)], NOW)

    [repeat] = authorizer.authorize_batch([auth_request(MAIN, 2_500, mti="0101")], LATER)

    assert repeat.fields == first.fields
    assert repeat.mti == "0101" and repeat.reason == "retransmission"
    assert response_fields(repeat)["t"] == "0110"
    assert len(open_holds(loaded, "acct-main")) == 1


def test_first_0101_without_an_original_is_decided(loaded: Ledger, authorizer: Authorizer) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 700, mti="0101")], NOW)
    assert (outcome.response_code, outcome.reason) == ("00", "approved")
    assert response_fields(outcome)["t"] == "0110"
    assert account_state(loaded, "acct-main")[1] == 700


def test_retransmitted_decline_stays_declined_after_funding(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    [first] = authorizer.authorize_batch([auth_request(CREDIT, 6_000)], NOW)
    assert first.response_code == "51"
    load_text(loaded, LOAD_FILE.replace(b"balance = 2000", b"balance = 20000"))

    [again] = authorizer.authorize_batch([auth_request(CREDIT, 6_000)], LATER)

    assert again.fields == first.fields
    assert again.response_code == "51"
    assert open_holds(loaded, "acct-credit") == []


@pytest.mark.parametrize(
    "change",
    [
        {"amount": 2_501},
        {"pan": CREDIT},
        {"mcc": "5999"},
        {"processing_code": "010000"},
        {"rrn": "633012999999"},
        {"currency": "840"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_same_identity_different_content_gets_94(
    loaded: Ledger, authorizer: Authorizer, change: dict[str, Any]
) -> None:
    original = auth_request(MAIN, 2_500)
    [first] = authorizer.authorize_batch([original], NOW)
    assert first.response_code == "00"
    with loaded.read() as reader:
        stored_before = reader.answer(b"0100|" + original.identity)
    held_before = {a: account_state(loaded, a)[1] for a in ("acct-main", "acct-credit")}

    arguments: dict[str, Any] = {"pan": MAIN, "amount": 2_500, **change}
    conflicting = auth_request(**arguments)
    assert conflicting.identity == original.identity
    [outcome] = authorizer.authorize_batch([conflicting], LATER)

    assert (outcome.response_code, outcome.reason) == ("94", "duplicate_different_content")
    fields = response_fields(outcome)
    assert fields["39"] == "94" and fields["t"] == "0110" and "38" not in fields
    assert fields["2"] == conflicting.pan  # the answer echoes the conflicting request
    assert {a: account_state(loaded, a)[1] for a in held_before} == held_before
    assert len(open_holds(loaded, "acct-main")) + len(open_holds(loaded, "acct-credit")) == 1
    with loaded.read() as reader:
        assert reader.answer(b"0100|" + original.identity) == stored_before
    # The original's own retransmission still gets the original answer.
    [again] = authorizer.authorize_batch([original], LATER)
    assert again.fields == first.fields


@pytest.mark.parametrize(
    "change",
    [{"stan": "000002"}, {"transmission": "1124120001"}, {"acquirer": "654321"}],
    ids=lambda change: next(iter(change)),
)
def test_any_part_of_the_identity_makes_a_new_transaction(
    loaded: Ledger, authorizer: Authorizer, change: dict[str, str]
) -> None:
    outcomes = authorizer.authorize_batch(
        [auth_request(MAIN, 2_500), auth_request(MAIN, 2_500, **change)], NOW
    )
    assert [o.reason for o in outcomes] == ["approved", "approved"]
    assert response_fields(outcomes[0])["38"] != response_fields(outcomes[1])["38"]
    assert account_state(loaded, "acct-main")[1] == 5_000
    assert len(open_holds(loaded, "acct-main")) == 2


def test_identical_requests_in_one_batch(loaded: Ledger, authorizer: Authorizer) -> None:
    first, second = authorizer.authorize_batch(
        [auth_request(MAIN, 2_500), auth_request(MAIN, 2_500)], NOW
    )
    assert first.reason == "approved"
    assert second.reason == "retransmission"
    assert second.fields == first.fields
    assert account_state(loaded, "acct-main")[1] == 2_500
    assert len(open_holds(loaded, "acct-main")) == 1


def test_conflict_inside_one_batch(loaded: Ledger, authorizer: Authorizer) -> None:
    first, second = authorizer.authorize_batch(
        [auth_request(MAIN, 2_500), auth_request(MAIN, 9_999)], NOW
    )
    assert first.reason == "approved"
    assert second.response_code == "94"
    assert account_state(loaded, "acct-main")[1] == 2_500


def test_batch_approves_only_what_fits(loaded: Ledger, authorizer: Authorizer) -> None:
    # acct-credit: posted 20.00 + credit limit 30.00 = 50.00 available.
    amounts = [2_000, 2_000, 2_000, 1_000, 1]
    requests = [auth_request(CREDIT, a, stan=f"{i + 1:06d}") for i, a in enumerate(amounts)]

    outcomes = authorizer.authorize_batch(requests, NOW)

    assert [o.response_code for o in outcomes] == ["00", "00", "51", "00", "51"]
    assert account_state(loaded, "acct-credit") == (2_000, 5_000, 0)
    holds = open_holds(loaded, "acct-credit")
    assert [h.amount for h in holds] == [2_000, 2_000, 1_000]
    codes = [response_fields(o).get("38") for o in outcomes]
    assert [h.approval_code for h in holds] == [codes[0], codes[1], codes[3]]


def test_hold_ids_and_approval_codes_continue_across_batches_and_reopen(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    load_text(ledger, LOAD_FILE)
    make_authorizer(ledger).authorize_batch([auth_request(MAIN, 100, stan="000001")], NOW)
    make_authorizer(ledger).authorize_batch([auth_request(MAIN, 100, stan="000002")], NOW)
    ledger.close()
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    try:
        make_authorizer(ledger).authorize_batch([auth_request(MAIN, 100, stan="000003")], NOW)
        holds = open_holds(ledger, "acct-main")
    finally:
        ledger.close()
    assert [h.hold_id for h in holds] == [1, 2, 3]
    assert len({h.approval_code for h in holds}) == 3


def test_stored_answer_has_no_pan(loaded: Ledger, authorizer: Authorizer) -> None:
    request = auth_request(MAIN, 2_500)
    [outcome] = authorizer.authorize_batch([request], NOW)

    with loaded.read() as reader:
        stored = reader.answer(b"0100|" + request.identity)
    assert stored is not None
    assert "2" not in stored.response
    assert MAIN not in msgspec.json.encode(stored).decode()
    fields = response_fields(outcome)
    # Neither the PAN nor what a replay takes from the retransmission (MTI, 39, 7, 11).
    left_out = ("2", "p", "t", "39", "7", "11")
    assert stored.response == {k: v for k, v in fields.items() if k not in left_out}
    assert (stored.response_code, stored.reason) == ("00", "approved")
    assert stored.card_id == card_id_for(HASHER.card_key(MAIN))
    [hold] = open_holds(loaded, "acct-main")
    assert stored.hold_id == hold.hold_id
    assert len(stored.fingerprint) == 16


@pytest.mark.parametrize("processing_code", ["200000", "310000", "400000"])
@pytest.mark.parametrize(
    ("mti", "reason"),
    [
        ("0120", "advice_unsupported_processing_code"),
        ("0220", "completion_unsupported_processing_code"),
    ],
)
def test_an_advice_of_a_refund_or_an_inquiry_moves_no_money(
    loaded: Ledger, authorizer: Authorizer, mti: str, reason: str, processing_code: str
) -> None:
    """An 0120 of a refund the network stood in for opened a hold for it, an 0220 of one
    posted it as a purchase: the money the cardholder was to get back was taken. Refunds are
    credited by clearing; an advice of anything but a purchase, cash or cashback changes
    nothing (and is acknowledged, as every advice is)."""
    before = account_state(loaded, "acct-main")
    advice = auth_request(MAIN, 2_000, mti=mti, processing_code=processing_code)
    [outcome] = authorizer.authorize_batch([advice], NOW)
    assert (outcome.response_code, outcome.reason) == ("00", reason)
    assert account_state(loaded, "acct-main") == before
    assert open_holds(loaded, "acct-main") == []
    with loaded.read() as reader:  # its event is in the card's account's stream
        [event] = reader.outbox(reader.outbox_last_sequence(), 1)
    assert (event.account_id, event.reason) == ("acct-main", reason)
    purchase = auth_request(MAIN, 2_000, mti=mti, stan="000002")  # the same as a purchase
    [outcome] = authorizer.authorize_batch([purchase], NOW)
    assert outcome.reason in ("stand_in_approved", "force_post")


def test_balance_inquiry_answers_field_54_and_holds_nothing(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    authorizer.authorize_batch([auth_request(CREDIT, 1_500, stan="000001")], NOW)
    request = auth_request(CREDIT, None, stan="000002", processing_code="310000")

    [outcome] = authorizer.authorize_batch([request], NOW)

    assert (outcome.response_code, outcome.reason) == ("00", "balance_inquiry")
    fields = response_fields(outcome)
    # An approval carries its code (DESIGN.md; the networks expect 38 whenever 39 is 00).
    assert len(fields["38"]) == 6 and "4" not in fields
    balances = fields["54"]
    assert len(balances) == 40
    ledger_block, available_block = balances[:20], balances[20:]
    # account type 00, amount type 01 ledger / 02 available, currency 978, C/D, 12 digits
    assert ledger_block == "0001978C000000002000"
    assert available_block == "0002978C000000003500"  # 20.00 + 30.00 credit - 15.00 held
    assert account_state(loaded, "acct-credit") == (2_000, 1_500, 3_500)
    assert len(open_holds(loaded, "acct-credit")) == 1


def test_balance_inquiry_of_an_overdrawn_account(loaded: Ledger, authorizer: Authorizer) -> None:
    load_text(loaded, LOAD_FILE.replace(b"balance = 2000", b"balance = -1000"))
    request = auth_request(CREDIT, None, processing_code="312000")

    [outcome] = authorizer.authorize_batch([request], NOW)

    assert response_fields(outcome)["54"] == "2001978D000000001000" + "2002978C000000002000"


def test_balance_inquiry_in_yen(authorizer: Authorizer) -> None:
    request = auth_request(YEN, None, processing_code="310000", currency="392")
    [outcome] = authorizer.authorize_batch([request], NOW)
    assert response_fields(outcome)["54"] == "0001392C000000050000" + "0002392C000000050000"


def test_ledger_failure_answers_96_for_the_whole_batch(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    load_text(ledger, LOAD_FILE)
    authorizer = make_authorizer(ledger)
    ledger.close()  # every transaction now fails

    outcomes = authorizer.authorize_batch(
        [auth_request(MAIN, 100, stan="000001"), auth_request(CREDIT, 100, stan="000002")], NOW
    )

    assert [o.response_code for o in outcomes] == ["96", "96"]
    assert all(o.reason.startswith("ledger_error:") for o in outcomes)
    assert all(response_fields(o)["39"] == "96" for o in outcomes)
    reopened = Ledger(tmp_path, durability="process", map_size_bytes=MAP_SIZE)
    try:
        assert account_state(reopened, "acct-main")[1] == 0
        with reopened.read() as reader:
            assert reader.answer(b"0100|123456|000001|1124120000") is None
    finally:
        reopened.close()


# --- spend-control usage through the Authorizer ---------------------------------------------------

LIMITED = "5200001111222274"  # a card with a daily amount limit of 100.00 EUR
LIMITED_FILE = f"""
[[accounts]]
id = "acct-limits"
currency = "EUR"
balance = 1000000

[[cards]]
pan = "{LIMITED}"
account = "acct-limits"
expiry = "3012"
controls.amount_limits = [{{ interval = "daily", amount = 10000, currency = "EUR" }}]
""".encode()


def message(mti: str, amount: int, stan: str, at: datetime, **extra: str) -> AuthorizationRequest:
    fields = {
        "t": mti,
        "2": LIMITED,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": at.strftime("%m%d%H%M%S"),
        "11": stan,
        "18": "5411",
        "22": "051",
        "32": "123456",
        "37": f"{int(stan):012d}",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
        **extra,
    }
    request = CODEC.decode(CODEC.encode(fields))
    assert isinstance(request, AuthorizationRequest)
    return request


def pointing_at(original: AuthorizationRequest) -> str:
    """Field 90 naming `original`: MTI, STAN, field 7, acquirer, forwarding institution."""
    return (
        f"{original.mti}{original.stan}{original.transmission_datetime}"
        f"{int(original.acquirer):011d}{0:011d}"
    )


def daily_usage(ledger: Ledger, at: datetime, zone: Any = UTC) -> tuple[int, int]:
    card_id = card_id_for(HASHER.card_key(LIMITED))
    with ledger.read() as reader:
        card = used(reader.usage("c:" + card_id), "daily", periods_at(_ms(at), zone))
        account = used(reader.usage("a:acct-limits"), "daily", periods_at(_ms(at), zone))
    assert card == account  # the account's only card
    return card


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def answers(
    authorizer: Authorizer, requests: list[AuthorizationRequest], at: datetime
) -> list[tuple[str, str]]:
    return [(o.response_code, o.reason) for o in authorizer.authorize_batch(requests, at)]


def test_approvals_count_against_limits_and_declines_do_not(ledger: Ledger) -> None:
    load_text(ledger, LIMITED_FILE)
    authorizer = make_authorizer(ledger)

    assert answers(
        authorizer,
        [
            message("0100", 6_000, "000001", NOW),
            message("0100", 4_001, "000002", NOW),  # 6 000 + 4 001 > 10 000
            message("0200", 4_000, "000003", NOW),  # a financial request counts too
            message("0100", 1, "000004", NOW),
        ],
        NOW,
    ) == [
        ("00", "approved"),
        ("61", "daily_amount_limit"),
        ("00", "approved"),
        ("61", "daily_amount_limit"),
    ]
    assert daily_usage(ledger, NOW) == (10_000, 2)
    # The next local day starts afresh.
    tomorrow = NOW + timedelta(days=1)
    assert answers(authorizer, [message("0100", 10_000, "000005", tomorrow)], tomorrow) == [
        ("00", "approved")
    ]


def test_a_stand_in_approval_counts_although_no_control_was_asked(ledger: Ledger) -> None:
    load_text(ledger, LIMITED_FILE)
    authorizer = make_authorizer(ledger)

    advice = message("0120", 12_000, "000001", NOW, **{"39": "00"})
    assert answers(authorizer, [advice], NOW) == [("00", "stand_in_approved")]
    assert daily_usage(ledger, NOW) == (12_000, 1)
    assert answers(authorizer, [message("0100", 1, "000002", NOW)], NOW) == [
        ("61", "daily_amount_limit")
    ]


def test_a_reversal_gives_usage_back_in_the_programme_zone(ledger: Ledger) -> None:
    # 23:30 UTC on 24 November is already 25 November in Berlin: the approval and its
    # reversal at 08:00 UTC fall on the same Berlin day, so the day's allowance comes back.
    load_text(ledger, LIMITED_FILE)
    berlin = ZoneInfo("Europe/Berlin")
    authorizer = Authorizer(
        ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600, zone=berlin
    )
    late = datetime(2026, 11, 24, 23, 30, tzinfo=UTC)
    morning = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
    original = message("0100", 10_000, "000001", late)
    assert answers(authorizer, [original], late) == [("00", "approved")]
    assert daily_usage(ledger, morning, berlin) == (10_000, 1)

    reversal = message("0400", 10_000, "000002", morning, **{"90": pointing_at(original)})
    assert answers(authorizer, [reversal], morning) == [("00", "reversed")]

    assert daily_usage(ledger, morning, berlin) == (0, 0)
    assert answers(authorizer, [message("0100", 10_000, "000003", morning)], morning) == [
        ("00", "approved")
    ]


def test_a_partial_reversal_gives_back_the_amount_it_reverses(ledger: Ledger) -> None:
    load_text(ledger, LIMITED_FILE)
    authorizer = make_authorizer(ledger)
    original = message("0100", 10_000, "000001", NOW)
    assert answers(authorizer, [original], NOW) == [("00", "approved")]

    partial = message(
        "0400",
        10_000,
        "000002",
        NOW,
        **{"90": pointing_at(original), "95": "000000003000" + "0" * 30},
    )
    assert answers(authorizer, [partial], NOW) == [("00", "partially_reversed")]
    assert daily_usage(ledger, NOW) == (3_000, 1)  # the approval itself still counts
    assert answers(
        authorizer,
        [message("0100", 7_001, "000003", NOW), message("0100", 7_000, "000004", NOW)],
        NOW,
    ) == [("61", "daily_amount_limit"), ("00", "approved")]


def test_a_reversal_of_yesterdays_approval_does_not_raise_todays_allowance(
    ledger: Ledger,
) -> None:
    load_text(ledger, LIMITED_FILE)
    authorizer = make_authorizer(ledger)
    tomorrow = NOW + timedelta(days=1)
    original = message("0100", 8_000, "000001", NOW)
    assert answers(authorizer, [original], NOW) == [("00", "approved")]
    assert answers(authorizer, [message("0100", 6_000, "000002", tomorrow)], tomorrow) == [
        ("00", "approved")
    ]

    reversal = message("0400", 8_000, "000003", tomorrow, **{"90": pointing_at(original)})
    assert answers(authorizer, [reversal], tomorrow) == [("00", "reversed")]

    assert daily_usage(ledger, tomorrow) == (6_000, 1)


def test_completion_and_expiry_change_no_usage(ledger: Ledger) -> None:
    load_text(ledger, LIMITED_FILE)
    authorizer = make_authorizer(ledger)
    first = message("0100", 6_000, "000001", NOW)
    second = message("0100", 2_000, "000002", NOW)
    assert answers(authorizer, [first, second], NOW) == [("00", "approved"), ("00", "approved")]

    completion = message("0220", 9_000, "000003", NOW, **{"90": pointing_at(first)})
    assert answers(authorizer, [completion], NOW) == [("00", "captured")]
    expired_at = NOW + timedelta(seconds=HOLD_LIFETIME_SECONDS + 1)
    assert authorizer.sweep_expired(expired_at, 10) == 1

    card_id = card_id_for(HASHER.card_key(LIMITED))
    with ledger.read() as reader:
        usage = reader.usage("c:" + card_id)
    assert used(usage, "daily", periods_at(_ms(NOW))) == (8_000, 2)
    assert used(usage, "all_time", periods_at(_ms(expired_at))) == (8_000, 2)


def test_reloading_a_card_keeps_what_the_ledger_counted_for_it(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    # A card's usage and history head are the ledger's (its state beside the account); a load
    # file rewrites the card record, which must not make the ledger forget them.
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 1_234)], NOW)
    assert response_fields(outcome)["39"] == "00"

    def state() -> tuple[object, bytes | None]:
        card = card_of(loaded, MAIN)
        assert card is not None
        with loaded.read() as reader:
            kept = reader.card_state(card)
            return msgspec.to_builtins(kept.usage), kept.last_answer

    before = state()
    assert before[0] is not None and before[1] is not None
    load_text(loaded, LOAD_FILE)  # the same cards again, as an operator reloads them
    assert state() == before
    card = card_of(loaded, MAIN)
    assert card is not None
    with loaded.read() as reader:
        [(key, answer)] = reader.card_history(card.card_id, 10)
        assert answer.response_code == "00" and key == before[1]


def test_a_card_moved_to_another_account_takes_its_state_along(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    [outcome] = authorizer.authorize_batch([auth_request(MAIN, 1_234)], NOW)
    assert response_fields(outcome)["39"] == "00"
    card = card_of(loaded, MAIN)
    assert card is not None
    with loaded.read() as reader:
        before = reader.card_state(card)
        accounts_before = reader.account_count()
    moved = LOAD_FILE.replace(
        b'pan = "5200001111222233"\naccount = "acct-main"',
        b'pan = "5200001111222233"\naccount = "acct-credit"',
    )
    assert moved != LOAD_FILE
    load_text(loaded, moved)
    card = card_of(loaded, MAIN)
    assert card is not None and card.account_id == "acct-credit"
    with loaded.read() as reader:
        after = reader.card_state(card)
        assert msgspec.to_builtins(after) == msgspec.to_builtins(before)
        assert reader.account_count() == accounts_before  # states are not accounts
        assert "acct-main" in {account.id for account in reader.accounts()}
        assert [key for key, _ in reader.card_history(card.card_id, 10)] == [before.last_answer]


# --- approval codes -------------------------------------------------------------------------


def test_approval_codes_come_from_the_random_source_and_differ_per_card_and_day() -> None:
    from processor.ledger.records import CardState
    from processor.lifecycle import new_approval_code

    draws = iter([7, 7, 123_456, 7, 999_999])
    state = CardState()
    assert new_approval_code(state, 100, lambda bound: next(draws)) == "000007"
    # The same number again that day is drawn anew, never answered twice.
    assert new_approval_code(state, 100, lambda bound: next(draws)) == "123456"
    # A new day forgets the old day's codes.
    assert new_approval_code(state, 101, lambda bound: next(draws)) == "000007"
    assert new_approval_code(state, 101, lambda bound: next(draws)) == "999999"
    assert state.approval_codes == [7, 999_999]


def test_a_busy_card_is_kept_unlike_its_first_codes_of_the_day() -> None:
    from processor import limits
    from processor.ledger.records import CardState
    from processor.lifecycle import new_approval_code

    remembered = limits.approval_codes_remembered_max
    counter = iter(range(10**6))
    state = CardState()
    for _ in range(remembered + 10):
        new_approval_code(state, 1, lambda bound: next(counter))
    assert state.approval_codes == list(range(remembered))  # sorted, the first ones
    again = iter([remembered - 1, 5, 999_999])  # two remembered codes, then a free one
    assert new_approval_code(state, 1, lambda bound: next(again)) == "999999"


def test_a_source_that_only_repeats_is_a_bug_not_an_answer() -> None:
    from processor.ledger.records import CardState
    from processor.lifecycle import new_approval_code

    state = CardState()
    new_approval_code(state, 1, lambda bound: 42)
    with pytest.raises(AssertionError, match="approval codes drawn"):
        new_approval_code(state, 1, lambda bound: 42)


def test_every_fresh_ledger_gives_other_approval_codes(tmp_path: Path) -> None:
    codes = []
    for name in ("one", "two"):
        ledger = Ledger(tmp_path / name, durability="process", map_size_bytes=MAP_SIZE)
        load_text(ledger, LOAD_FILE)
        [outcome] = make_authorizer(ledger).authorize_batch([auth_request(MAIN, 100)], NOW)
        codes.append(response_fields(outcome)["38"])
        ledger.close()
    assert codes[0] != codes[1]  # 1 in 10^6 to fail by chance; a sequence always did


def test_the_stored_answer_keeps_what_is_left_to_give_back(ledger: Ledger) -> None:
    # What a reversal gave back is taken off the original's stored usage, so a second
    # reversal can never give it back twice.
    load_text(ledger, LIMITED_FILE)
    authorizer = make_authorizer(ledger)
    original = message("0100", 10_000, "000001", NOW)
    assert answers(authorizer, [original], NOW) == [("00", "approved")]
    key = original.answer_key

    def stored() -> tuple[int, str]:
        with ledger.read() as reader:
            answer = reader.answer(key)
            assert answer is not None
            return answer.usage_amount, answer.usage_mcc

    assert stored() == (10_000, "5411")
    partial = message(
        "0400",
        10_000,
        "000002",
        NOW,
        **{"90": pointing_at(original), "95": "000000003000" + "0" * 30},
    )
    assert answers(authorizer, [partial], NOW) == [("00", "partially_reversed")]
    assert stored() == (3_000, "5411")
    full = message("0400", 10_000, "000003", NOW, **{"90": pointing_at(original)})
    assert answers(authorizer, [full], NOW) == [("00", "reversed")]
    assert stored() == (0, "")  # given back whole: nothing left to give
    assert daily_usage(ledger, NOW) == (0, 0)


def test_a_load_does_not_bring_a_stopped_card_back(loaded: Ledger) -> None:
    """Lost, stolen and closed are final, through a load as through the API."""
    stopped = LOAD_FILE.replace(b'expiry = "2611"', b'expiry = "2611"\nstatus = "lost"')
    load_text(loaded, stopped)
    with pytest.raises(LoadError, match=r"\.status: card .* is lost, which is final"):
        load_text(loaded, LOAD_FILE)  # the file from before: the card active again
    card = card_of(loaded, CREDIT)
    assert card is not None and card.status == "lost"
    load_text(loaded, stopped)  # the same again changes nothing and is no error


def test_a_file_a_cards_history_refuses_changes_nothing_not_even_its_accounts(
    ledger: Ledger,
) -> None:
    """The final-status check ran as its card was written, after the file's accounts were:
    the refused file had moved a balance and created an account all the same."""
    closed = ACCOUNT + b"\n" + card_entry(MAIN, 'status = "closed"\n')
    apply_load_file(ledger, parse_load_file(closed, "first.toml"), HASHER, "first.toml")
    again = (
        ACCOUNT.replace(b"balance = 100", b"balance = 999999")
        + b'\n[[accounts]]\nid = "new"\ncurrency = "EUR"\nbalance = 5\n\n'
        + card_entry(MAIN, 'status = "active"\n')
    )
    with pytest.raises(LoadError, match=r"\$\.cards\[0\]\.status: .* which is final"):
        apply_load_file(ledger, parse_load_file(again, "again.toml"), HASHER, "again.toml")
    with ledger.read() as reader:
        account = reader.account("a")
        assert account is not None and account.posted == 100
        assert reader.account("new") is None


def test_an_account_or_a_card_in_a_file_twice_is_refused_naming_both(ledger: Ledger) -> None:
    twice = (
        ACCOUNT
        + b"\n"
        + ACCOUNT.replace(b"balance = 100", b"balance = 5")
        + b"\n"
        + card_entry(MAIN)
        + b"\n"
        + card_entry(MAIN).replace(b"3012", b"2901")
    )
    with pytest.raises(LoadError) as raised:
        apply_load_file(ledger, parse_load_file(twice, "twice.toml"), HASHER, "twice.toml")
    message = str(raised.value)
    assert "$.accounts[1].id: account 'a' is in the file twice (also $.accounts[0])" in message
    assert f"$.cards[1].pan: card {mask_pan(MAIN)} is in the file twice (also $.cards[0])" in (
        message
    )
    assert MAIN not in message
    with ledger.read() as reader:
        assert reader.account_count() == 0


def _reversal_of(original: AuthorizationRequest, stan: str) -> AuthorizationRequest:
    """A full 0400 naming `original` in field 90."""
    pointing = (
        f"{original.mti}{original.stan}{original.transmission_datetime}"
        f"{int(original.acquirer or '0'):011d}{0:011d}"
    )
    fields = {
        "t": "0400",
        "2": MAIN,
        "3": "000000",
        "4": "000000001000",
        "7": "1124120500",
        "11": stan,
        "32": "123456",
        "37": f"63301200{stan[-4:]}",
        "49": "978",
        "90": pointing,
    }
    return CODEC.decode(CODEC.encode(fields))


def test_a_posted_purchase_is_not_credited_back_after_its_accounts_currency_changed(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """A 0200 of 10.00 EUR, the account reloaded in JPY, then its reversal: 1,000 minor units
    of euros were credited as 1,000 yen. Nothing is applied now; the event says why."""
    original = auth_request(mti="0200", amount=1_000)
    [posted] = authorizer.authorize_batch([original], NOW)
    assert posted.response_code == "00"
    load_text(
        loaded,
        LOAD_FILE.replace(
            b'id = "acct-main"\ncurrency = "EUR"', b'id = "acct-main"\ncurrency = "JPY"'
        ),
    )
    before = account_state(loaded, "acct-main")
    [reversed_] = authorizer.authorize_batch(
        [_reversal_of(original, "000002")], NOW + timedelta(minutes=5)
    )
    assert (reversed_.response_code, reversed_.reason) == ("00", "currency_changed")
    assert account_state(loaded, "acct-main") == before


def test_a_reversal_gives_back_no_amount_to_usage_counted_in_another_currency(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """An EUR hold, then its card moved to a JPY account with a daily limit of 5,000 yen, used
    up; the hold's reversal gave 1,000 back to the yen counters, and 1,000 yen more were
    approved past the limit."""
    original = auth_request(amount=1_000)
    [approved] = authorizer.authorize_batch([original], NOW)
    assert approved.response_code == "00"
    load_text(
        loaded,
        f'[[cards]]\npan = "{MAIN}"\naccount = "acct-yen"\nexpiry = "3012"\ncontrols.'
        'amount_limits = [{ interval = "daily", amount = 5000, currency = "JPY" }]\n'.encode(),
    )
    spend = auth_request(amount=5_000, currency="392", stan="000003", rrn="633012000003")
    [yen] = authorizer.authorize_batch([spend], NOW + timedelta(minutes=1))
    assert yen.response_code == "00", yen.reason  # the day's 5,000 yen used up
    [reversal] = authorizer.authorize_batch(
        [_reversal_of(original, "000002")], NOW + timedelta(minutes=2)
    )
    assert reversal.reason == "reversed"  # the EUR hold released, on its EUR account
    more = auth_request(amount=1_000, currency="392", stan="000004", rrn="633012000004")
    [again] = authorizer.authorize_batch([more], NOW + timedelta(minutes=3))
    assert (again.response_code, again.reason) == ("61", "daily_amount_limit")


def _card_with_daily_limit(account: str, amount: int, currency: str) -> bytes:
    return (
        f'[[cards]]\npan = "{MAIN}"\naccount = "{account}"\nexpiry = "3012"\ncontrols.'
        f'amount_limits = [{{ interval = "daily", amount = {amount}, currency = "{currency}" }}]\n'
    ).encode()


def test_a_card_moved_away_and_back_gets_back_no_amount_it_no_longer_counts(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """Its usage amounts started again twice (yen, then euros): the reversal of a hold from
    before still took its amount off the new count, and 20.00 went through a 15.00 limit."""
    load_text(loaded, _card_with_daily_limit("acct-main", 1_500, "EUR"))
    original = auth_request(amount=1_000)
    [first] = authorizer.authorize_batch([original], NOW)
    assert first.response_code == "00"
    load_text(loaded, _card_with_daily_limit("acct-yen", 5_000, "JPY"))
    load_text(loaded, _card_with_daily_limit("acct-main", 1_500, "EUR"))
    later = auth_request(amount=1_000, stan="000003", rrn="633012000003")
    [second] = authorizer.authorize_batch([later], NOW + timedelta(minutes=1))
    assert second.response_code == "00"
    [reversal] = authorizer.authorize_batch(
        [_reversal_of(original, "000002")], NOW + timedelta(minutes=2)
    )
    assert reversal.reason == "reversed"
    more = auth_request(amount=1_000, stan="000004", rrn="633012000004")
    [third] = authorizer.authorize_batch([more], NOW + timedelta(minutes=3))
    assert (third.response_code, third.reason) == ("61", "daily_amount_limit")


def test_a_currency_change_stamped_before_a_purchase_it_commits_after_still_covers_it(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """A load's time is taken before its write waits for the lock: a 0200 committed meanwhile
    (no hold: nothing refuses the change) was later than the stamp, counted as of the new
    currency, and its reversal credited euro cents as yen."""
    original = auth_request(mti="0200", amount=1_000)
    [posted] = authorizer.authorize_batch([original], NOW)
    assert posted.response_code == "00"
    jpy = LOAD_FILE.replace(
        b'id = "acct-main"\ncurrency = "EUR"', b'id = "acct-main"\ncurrency = "JPY"'
    )
    stamp = int(NOW.timestamp() * 1000) - 5  # taken 5 ms before the 0200 committed
    apply_load_file(loaded, parse_load_file(jpy, "x.toml"), HASHER, "x.toml", now_ms=stamp)
    before = account_state(loaded, "acct-main")
    [reversal] = authorizer.authorize_batch(
        [_reversal_of(original, "000002")], NOW + timedelta(minutes=5)
    )
    assert (reversal.reason, account_state(loaded, "acct-main")) == ("currency_changed", before)


def test_a_purchase_answered_after_a_currency_change_in_a_batch_timed_before_it_is_reversed(
    loaded: Ledger, authorizer: Authorizer
) -> None:
    """A batch reads its clock before it waits for the writer lock: one committed after the
    load, in the new currency, could carry a time at or before the change's, and its reversal
    was refused as of the old currency (00 currency_changed, nothing given back)."""
    first = auth_request(mti="0200", amount=1_000, stan="000001", rrn="633012000001")
    [eur] = authorizer.authorize_batch([first], NOW)  # committed before the load
    assert eur.response_code == "00"
    jpy = LOAD_FILE.replace(
        b'id = "acct-main"\ncurrency = "EUR"', b'id = "acct-main"\ncurrency = "JPY"'
    )
    stamp = int(NOW.timestamp() * 1000)
    apply_load_file(loaded, parse_load_file(jpy, "x.toml"), HASHER, "x.toml", now_ms=stamp)
    before = account_state(loaded, "acct-main")
    later = auth_request(
        mti="0200", amount=1_000, currency="392", stan="000005", rrn="633012000005"
    )
    [yen] = authorizer.authorize_batch([later], NOW)  # timed in the load's millisecond
    assert yen.response_code == "00", yen.reason
    assert account_state(loaded, "acct-main") != before
    [reversal] = authorizer.authorize_batch(
        [_reversal_of(later, "000006")], NOW + timedelta(minutes=5)
    )
    assert (reversal.response_code, reversal.reason) == ("00", "reversed")
    assert account_state(loaded, "acct-main") == before
