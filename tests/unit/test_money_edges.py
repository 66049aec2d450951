"""Money at the edges a review found: amounts that convert to nothing, a completion of 0, a
partial approval reversed in part, and completions or reversals naming another card's
transaction. Each drives the real Authorizer against a scratch ledger of two EUR accounts of
100.00, and checks what the answers say and what the balances hold."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from processor.authorizer import Authorizer, Outcome
from processor.catalog import default_catalog
from processor.clearing import apply_clearing, parse_lines
from processor.engine import ProgrammeRules
from processor.ledger.load import apply_load_file, parse_load_file
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

HASHER = PanHasher(b"money-edges-key")
CODEC = Codec(load_spec())
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
PAN_A, PAN_B = "5200001111222233", "5200001111222241"
LOAD = f"""
[[accounts]]
id = "acct-a"
currency = "EUR"
balance = 10000

[[accounts]]
id = "acct-b"
currency = "EUR"
balance = 10000

[[cards]]
pan = "{PAN_A}"
account = "acct-a"
expiry = "3012"

[[cards]]
pan = "{PAN_B}"
account = "acct-b"
expiry = "3012"
""".encode()


def build(tmp_path: Path, rules: ProgrammeRules | None = None) -> tuple[Ledger, Authorizer]:
    ledger = Ledger(tmp_path / "ledger", durability="process", map_size_bytes=64 << 20)
    apply_load_file(
        ledger, parse_load_file(LOAD, "test"), HASHER, "test", now_ms=int(START.timestamp() * 1000)
    )
    rules = rules or ProgrammeRules(catalog=default_catalog())
    return ledger, Authorizer(ledger, HASHER, rules, hold_lifetime_seconds=7 * 86400)


def request(mti: str = "0100", **fields: str) -> AuthorizationRequest:
    values = {
        "t": mti,
        "2": PAN_A,
        "3": "000000",
        "7": "1124120000",
        "18": "5411",
        "32": "123456",
        "49": "978",
        "37": "000000000001",
    }
    values.update(fields)
    decoded = CODEC.decode(CODEC.encode(values))
    assert isinstance(decoded, AuthorizationRequest)
    return decoded


def original_data(mti: str, stan: str) -> str:
    """Field 90 naming the request `mti` + `stan` of `request()`'s acquirer and time."""
    return f"{mti}{stan}1124120000{123456:011d}{0:011d}"


def balances(ledger: Ledger, account_id: str) -> tuple[int, int]:
    """(posted, held) in minor units."""
    with ledger.read() as reader:
        account = reader.account(account_id)
    assert account is not None
    return account.posted, account.held


def answer(authorizer: Authorizer, *requests: AuthorizationRequest) -> list[Outcome]:
    return authorizer.authorize_batch(list(requests), START)


def test_a_billing_amount_of_zero_is_declined_not_approved_for_nothing(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    [outcome] = answer(
        authorizer,
        request(
            "0200", **{"4": "000009999999", "11": "000001", "49": "840", "6": "0" * 12, "51": "978"}
        ),
    )
    assert (outcome.response_code, outcome.reason) == ("13", "invalid_amount")
    assert balances(ledger, "acct-a") == (10000, 0)


def test_an_amount_converting_to_less_than_a_cent_is_declined(tmp_path: Path) -> None:
    rules = ProgrammeRules(rates={("KRW", "EUR"): Decimal("0.00063")}, catalog=default_catalog())
    ledger, authorizer = build(tmp_path, rules)
    [outcome] = answer(authorizer, request(**{"4": "000000000007", "11": "000001", "49": "410"}))
    assert (outcome.response_code, outcome.reason) == ("13", "invalid_amount")
    assert balances(ledger, "acct-a") == (10000, 0)


def test_an_amount_converting_past_twelve_digits_is_declined_not_held_unanswerable(
    tmp_path: Path,
) -> None:
    """Field 6 is n12: 1,000,000.00 EUR at 17,500 IDR was approved and held with an answer
    that could not be encoded, so it was never sent, nor any repeat's."""
    rules = ProgrammeRules(rates={("USD", "EUR"): Decimal("1000000")}, catalog=default_catalog())
    ledger, authorizer = build(tmp_path, rules)
    with ledger.write() as writer:  # enough to approve it
        account = writer.account("acct-a")
        assert account is not None
        account.posted = 10**14
        writer.put_account(account)
    [outcome] = answer(authorizer, request(**{"4": "000010000000", "11": "000001", "49": "840"}))
    assert (outcome.response_code, outcome.reason) == ("13", "invalid_amount")
    assert balances(ledger, "acct-a") == (10**14, 0)


def test_a_stand_in_advice_worth_nothing_is_acknowledged_and_fails_no_batch(
    tmp_path: Path,
) -> None:
    """It reached a hold of 0, whose assertion failed the whole batch (96 to the others, and
    the daemon stops on an assertion): the network would resend it for ever."""
    ledger, authorizer = build(tmp_path)
    good = request(**{"4": "000000000100", "11": "000009"})
    advice = request(
        "0120",
        **{
            "4": "000000005000",
            "11": "000001",
            "49": "840",
            "6": "0" * 12,
            "51": "978",
            "39": "00",
        },
    )
    outcomes = answer(authorizer, good, advice)
    assert [(o.response_code, o.reason) for o in outcomes] == [
        ("00", "approved"),
        ("00", "advice_invalid_amount"),
    ]
    assert balances(ledger, "acct-a") == (10000, 100)


def test_a_completion_of_zero_changes_nothing_and_fails_no_batch(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001"}))
    outcomes = answer(
        authorizer,
        request("0220", **{"4": "0" * 12, "11": "000002", "90": original_data("0100", "000001")}),
        request("0220", **{"4": "0" * 12, "11": "000003"}),  # no original: not a force post
    )
    assert [o.reason for o in outcomes] == ["completion_invalid_amount"] * 2
    assert balances(ledger, "acct-a") == (10000, 3000)


def test_a_partial_approval_reversed_in_part_keeps_what_was_spent(tmp_path: Path) -> None:
    """150.00 asked with field 6 in the account's own currency (as Mastercard sends it),
    100.00 approved (10), then 40.00 said to be the final amount: the hold is 40.00. Field 6
    was read as a conversion, and the reversal scaled by 150/100."""
    ledger, authorizer = build(tmp_path)
    partial = "R" + "61" + "03" + "100"  # field 48: the merchant takes a partial approval
    [approved] = answer(
        authorizer,
        request(
            **{"4": "000000015000", "11": "000001", "48": partial, "6": "000000015000", "51": "978"}
        ),
    )
    assert (approved.response_code, approved.fields["4"]) == ("10", "000000010000")
    answer(
        authorizer,
        request(
            "0400",
            **{
                "4": "000000015000",
                "11": "000002",
                "90": original_data("0100", "000001"),
                "95": f"{4000:012d}" + "0" * 30,
            },
        ),
    )
    assert balances(ledger, "acct-a") == (10000, 4000)


def test_a_completion_naming_another_cards_transaction_moves_no_money(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001", "2": PAN_B}))
    [completion] = answer(
        authorizer,
        request(
            "0220",
            **{
                "4": "000000009000",
                "11": "000002",
                "2": PAN_A,
                "90": original_data("0100", "000001"),
            },
        ),
    )
    assert (completion.response_code, completion.reason) == ("00", "card_mismatch")
    assert balances(ledger, "acct-b") == (10000, 3000)  # B's hold stands, nothing posted
    assert balances(ledger, "acct-a") == (10000, 0)


def test_a_reversal_naming_another_cards_transaction_moves_no_money(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001", "2": PAN_B}))
    outcomes = answer(
        authorizer,
        request(
            "0400",
            **{
                "4": "000000003000",
                "11": "000002",
                "2": PAN_A,
                "90": original_data("0100", "000001"),
            },
        ),
        request(
            "0420",
            **{
                "4": "000000003000",
                "11": "000003",
                "2": PAN_A,
                "90": original_data("0100", "000001"),
            },
        ),
    )
    assert [(o.response_code, o.reason) for o in outcomes] == [
        ("25", "original_not_found"),
        ("00", "card_mismatch"),
    ]
    assert balances(ledger, "acct-b") == (10000, 3000)


def presentment(amount: int) -> list[bytes]:
    """A clearing purchase record for `request()`'s 0100 of STAN 000001 on card A."""
    record = {
        "record_id": "r1",
        "type": "purchase",
        "pan": PAN_A,
        "acquirer": "123456",
        "stan": "000001",
        "transmission_datetime": "1124120000",
        "amount": amount,
        "currency": "EUR",
        "rrn": "000000000001",
    }
    return [json.dumps(record).encode()]


def test_a_purchase_force_posted_by_its_completion_is_not_posted_again_by_clearing(
    tmp_path: Path,
) -> None:
    """Its hold expired, the 0220 posts 30.00 as the network says; the presentment of the same
    purchase then finds it posted (it posted it a second time)."""
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001"}))
    later = START + timedelta(days=8)
    assert authorizer.sweep_expired(later, 512) == 1
    [completion] = authorizer.authorize_batch(
        [
            request(
                "0220",
                **{
                    "4": "000000003000",
                    "11": "000002",
                    "7": "1202120000",
                    "90": original_data("0100", "000001"),
                },
            )
        ],
        later,
    )
    assert completion.reason == "force_post"
    summary = apply_clearing(ledger, parse_lines(presentment(3000)), HASHER, later)
    assert summary.already_posted == 1
    assert balances(ledger, "acct-a") == (7000, 0)


def test_a_purchase_force_posted_by_clearing_is_not_posted_again_by_its_completion(
    tmp_path: Path,
) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001"}))
    answer(
        authorizer,
        request(
            "0420", **{"4": "000000003000", "11": "000002", "90": original_data("0100", "000001")}
        ),
    )
    summary = apply_clearing(ledger, parse_lines(presentment(3000)), HASHER, START)
    assert summary.force_posted == 1
    [completion] = answer(
        authorizer,
        request(
            "0220", **{"4": "000000003000", "11": "000003", "90": original_data("0100", "000001")}
        ),
    )
    assert completion.reason == "already_posted"
    assert balances(ledger, "acct-a") == (7000, 0)


# --- an 0120 about a transaction the issuer approved itself -----------------------------------
# The issuer's 0110 reached the network after its timeout; the network stood in, approved, and
# told the issuer with an 0120 of the same acquirer, STAN and field 7. One purchase, one hold.


def stand_in(
    stan: str = "000001", amount: str = "000000003000", **fields: str
) -> AuthorizationRequest:
    return request("0120", **{"4": amount, "11": stan, "39": "00", **fields})


def test_an_advice_of_an_approved_authorisation_opens_no_second_hold(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    [approved] = answer(authorizer, request(**{"4": "000000003000", "11": "000001"}))
    [advice] = answer(authorizer, stand_in())
    assert (approved.response_code, advice.response_code) == ("00", "00")
    assert advice.reason == "advice_of_issuer_approval"
    assert balances(ledger, "acct-a") == (10000, 3000)
    with ledger.read() as reader:
        holds = reader.account_holds("acct-a")
    assert [hold.status for hold in holds] == ["open"]


def test_the_one_hold_is_released_whichever_message_the_reversal_names(tmp_path: Path) -> None:
    for number, named in enumerate(
        (
            {"90": original_data("0100", "000001")},
            {"90": original_data("0120", "000001")},
            {"37": "000000000001"},  # no field 90: by acquirer, STAN and RRN
        )
    ):
        ledger, authorizer = build(tmp_path / str(number))
        answer(authorizer, request(**{"4": "000000003000", "11": "000001"}), stand_in())
        reversal = request("0400", **{"4": "000000003000", "11": "000002", **named})
        if "90" not in named:
            reversal = request("0400", **{"4": "000000003000", "11": "000001", **named})
        [reversed_] = answer(authorizer, reversal)
        assert (reversed_.response_code, reversed_.reason) == ("00", "reversed"), named
        assert balances(ledger, "acct-a") == (10000, 0), named


def test_a_completion_naming_the_advice_captures_the_approvals_hold(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001"}), stand_in())
    [completion] = answer(
        authorizer,
        request(
            "0220", **{"4": "000000002500", "11": "000002", "90": original_data("0120", "000001")}
        ),
    )
    assert completion.reason == "captured"
    assert balances(ledger, "acct-a") == (7500, 0)


def test_clearing_of_the_advice_captures_the_approvals_hold(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001"}), stand_in())
    line = {
        "record_id": "clr-1",
        "type": "purchase",
        "pan": PAN_A,
        "acquirer": "123456",
        "stan": "000001",
        "transmission_datetime": "1124120000",
        "original_mti": "0120",
        "amount": 2800,
        "currency": "EUR",
    }
    summary = apply_clearing(ledger, parse_lines([json.dumps(line).encode()]), HASHER, START)
    assert (summary.matched, summary.force_posted, summary.rejections) == (1, 0, []), summary
    assert balances(ledger, "acct-a") == (7200, 0)


def test_an_advice_after_a_decline_or_a_release_opens_the_stand_in_hold(tmp_path: Path) -> None:
    """The network's stand-in is then the only approval: its hold is the purchase's."""
    ledger, authorizer = build(tmp_path)
    declined, released = "000001", "000002"
    answer(
        authorizer,
        request(**{"4": "000000900000", "11": declined}),  # over the balance: 51
        request(**{"4": "000000001000", "11": released}),
    )
    answer(
        authorizer,
        request(
            "0400", **{"4": "000000001000", "11": "000003", "90": original_data("0100", released)}
        ),
    )
    assert balances(ledger, "acct-a") == (10000, 0)
    outcomes = answer(
        authorizer, stand_in(declined, "000000002000"), stand_in(released, "000000001000")
    )
    assert [o.reason for o in outcomes] == ["stand_in_approved", "stand_in_approved"]
    assert balances(ledger, "acct-a") == (10000, 3000)


def test_an_advice_of_another_cards_approval_is_not_taken_for_it(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000003000", "11": "000001", "2": PAN_B}))
    [advice] = answer(authorizer, stand_in())
    assert advice.reason == "stand_in_approved"
    assert balances(ledger, "acct-a") == (10000, 3000)
    assert balances(ledger, "acct-b") == (10000, 3000)


# --- a completion and a presentment of one purchase nobody authorised here ------------------


def presentment_of(stan: str, amount: int, record_id: str) -> list[bytes]:
    record = {
        "record_id": record_id,
        "type": "purchase",
        "pan": PAN_A,
        "acquirer": "123456",
        "stan": stan,
        "transmission_datetime": "1124120000",
        "amount": amount,
        "currency": "EUR",
        "rrn": "000000000001",
    }
    return [json.dumps(record).encode()]


def completion_of(stan: str, amount: str, *, by_field_90: bool) -> AuthorizationRequest:
    if by_field_90:
        return request("0220", **{"4": amount, "11": "000077", "90": original_data("0100", stan)})
    return request("0220", **{"4": amount, "11": stan})  # acquirer, STAN and RRN: the original's


def test_a_completion_then_a_presentment_of_one_unauthorised_purchase_debit_once(
    tmp_path: Path,
) -> None:
    """force_post marked an original posted only when one was found: with none, the 0220
    and the presentment each debited the purchase."""
    for number, by_field_90 in enumerate((True, False)):
        ledger, authorizer = build(tmp_path / str(number))
        [posted] = answer(
            authorizer, completion_of("000001", "000000003000", by_field_90=by_field_90)
        )
        assert posted.reason == "force_post"
        summary = apply_clearing(
            ledger, parse_lines(presentment_of("000001", 3000, "clr-1")), HASHER, START
        )
        assert (summary.already_posted, summary.force_posted) == (1, 0), by_field_90
        assert balances(ledger, "acct-a") == (7000, 0), by_field_90


def test_a_presentment_then_a_completion_of_one_unauthorised_purchase_debit_once(
    tmp_path: Path,
) -> None:
    for number, by_field_90 in enumerate((True, False)):
        ledger, authorizer = build(tmp_path / str(number))
        summary = apply_clearing(
            ledger, parse_lines(presentment_of("000001", 3000, "clr-1")), HASHER, START
        )
        assert summary.force_posted == 1
        [completion] = answer(
            authorizer, completion_of("000001", "000000003000", by_field_90=by_field_90)
        )
        assert completion.reason == "already_posted", by_field_90
        assert balances(ledger, "acct-a") == (7000, 0), by_field_90
        # Another purchase of the same card is its own: posted.
        other = apply_clearing(
            ledger, parse_lines(presentment_of("000002", 500, "clr-2")), HASHER, START
        )
        assert other.force_posted == 1
        assert balances(ledger, "acct-a") == (6500, 0)


def test_a_reversal_naming_the_declined_or_unseen_0100_releases_the_stand_in_hold(
    tmp_path: Path,
) -> None:
    """The network stood in for an 0100 this issuer declined (or never received) and its
    0120 opened the hold; the acquirer's reversal names the 0100 in field 90. It found the
    declined answer (original_declined) or nothing (25), and the hold stayed."""
    for number, declined_first in enumerate((True, False)):
        ledger, authorizer = build(tmp_path / str(number))
        if declined_first:
            [declined] = answer(authorizer, request(**{"4": "000000900000", "11": "000001"}))
            assert declined.response_code == "51"
        [advice] = answer(authorizer, stand_in("000001", "000000003000"))
        assert advice.reason == "stand_in_approved"
        assert balances(ledger, "acct-a") == (10000, 3000)
        named = {"90": original_data("0100", "000001")}
        [reversal] = answer(
            authorizer, request("0400", **{"4": "000000003000", "11": "000002", **named})
        )
        assert (reversal.response_code, reversal.reason) == ("00", "reversed"), declined_first
        assert balances(ledger, "acct-a") == (10000, 0), declined_first


def test_a_completion_naming_the_declined_0100_captures_the_stand_in_hold(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000900000", "11": "000001"}))  # 51
    answer(authorizer, stand_in("000001", "000000003000"))
    [completion] = answer(
        authorizer,
        request(
            "0220", **{"4": "000000002000", "11": "000002", "90": original_data("0100", "000001")}
        ),
    )
    assert completion.reason == "captured"
    assert balances(ledger, "acct-a") == (8000, 0)


def test_a_converted_stand_in_says_what_it_held_and_is_reversed_in_part_by_it(
    tmp_path: Path,
) -> None:
    """An 0120 of 10,000 JPY held 60.00 EUR but kept no field 6: a reversal down to 5,000 JPY
    read field 95 as 50.00 EUR, and the event had no billing amount."""
    rules = ProgrammeRules(rates={("JPY", "EUR"): Decimal("0.006")}, catalog=default_catalog())
    ledger, authorizer = build(tmp_path, rules)
    [advice] = answer(authorizer, stand_in("000001", "000000010000", **{"49": "392"}))
    assert (advice.fields["6"], advice.fields["51"]) == ("000000006000", "978")
    assert balances(ledger, "acct-a") == (10000, 6000)
    [reversal] = answer(
        authorizer,
        request(
            "0400",
            **{
                "4": "000000010000",
                "49": "392",
                "11": "000002",
                "90": original_data("0120", "000001"),
                "95": "000000005000" + "0" * 30,
            },
        ),
    )
    assert reversal.reason == "partially_reversed"
    assert balances(ledger, "acct-a") == (10000, 3000)


def last_event_billing(ledger: Ledger) -> tuple[object, object]:
    """(billing_amount, amount) of the newest event, as a receiver gets them."""
    from processor.events import render

    with ledger.read() as reader:
        event = render(reader.outbox(0, 100_000)[-1], reader.ledger_id())
    data = event.data
    billing = None if data.billing_amount is None else data.billing_amount.amount
    return billing, None if data.amount is None else data.amount.amount


def test_a_partial_approval_says_what_it_held_in_field_6_too(tmp_path: Path) -> None:
    """Field 6 (the network's, in the account's own currency) was echoed: the 0110 said 4 =
    100.00 approved but 6 = 150.00, and so did the event's billing amount."""
    ledger, authorizer = build(tmp_path)
    partial = "R" + "61" + "03" + "100"
    [approved] = answer(
        authorizer,
        request(
            **{"4": "000000015000", "11": "000001", "48": partial, "6": "000000015000", "51": "978"}
        ),
    )
    assert approved.response_code == "10"
    assert (approved.fields["4"], approved.fields["6"]) == ("000000010000", "000000010000")
    assert last_event_billing(ledger) == (10000, 15000)


def test_a_partial_approval_s_event_says_what_was_approved_without_field_6(tmp_path: Path) -> None:
    """In the account's currency, no field 6: the event's amount is what was asked (150.00)
    and nothing carried the 100.00 approved and held, which specs/events.md promises in its
    billing amount."""
    ledger, authorizer = build(tmp_path)
    partial = "R" + "61" + "03" + "100"
    [approved] = answer(authorizer, request(**{"4": "000000015000", "11": "000001", "48": partial}))
    assert (approved.response_code, approved.fields["4"]) == ("10", "000000010000")
    assert last_event_billing(ledger) == (10000, 15000)


def test_a_billing_amount_in_another_currency_is_not_shown_as_the_accounts(
    tmp_path: Path,
) -> None:
    """An EUR purchase on the EUR account with the network's field 6 in JPY (51 = 392): the
    event showed 1,600 JPY as 16.00 EUR."""
    ledger, authorizer = build(tmp_path)
    answer(
        authorizer,
        request(**{"4": "000000001000", "11": "000001", "6": "000000001600", "51": "392"}),
    )
    assert last_event_billing(ledger) == (None, 1000)


def test_a_card_record_from_before_card_controls_keeps_its_limits(tmp_path: Path) -> None:
    """Card records once carried a per-transaction limit and blocked MCCs of their own; when
    controls came, the engine stopped reading them and nothing rewrote them: such a card
    approved 90.00 over its 50.00 limit, and at an MCC it blocked."""
    import msgspec as msgspec_module

    ledger, authorizer = build(tmp_path)
    key = HASHER.card_key(PAN_A)
    with ledger.write() as writer:
        card = writer.card(key)
        assert card is not None and card.controls is None
        legacy = msgspec_module.structs.replace(
            card, per_transaction_limit=5000, blocked_mccs=("5933",)
        )
        writer.put_card(key, legacy, card.account_id)
    outcomes = answer(
        authorizer,
        request(**{"4": "000000009000", "11": "000001"}),
        request(**{"4": "000000001000", "11": "000002", "18": "5933"}),
        request(**{"4": "000000001000", "11": "000003"}),
    )
    assert [(o.response_code, o.reason) for o in outcomes] == [
        ("61", "per_authorization_amount_limit"),
        ("57", "mcc_blocked"),
        ("00", "approved"),
    ]


def test_a_declined_0100_already_posted_does_not_lead_to_a_later_stand_in(
    tmp_path: Path,
) -> None:
    """Declined, then force-posted by a 0220, then an 0120 held the purchase again: the
    presentment naming the 0100 captured that hold, a second debit. (The 0120 holds nothing
    now either: advice_of_posted_purchase.)"""
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000900000", "11": "000001"}))  # 51
    answer(
        authorizer,
        request(
            "0220", **{"4": "000000003000", "11": "000002", "90": original_data("0100", "000001")}
        ),
    )
    answer(authorizer, stand_in("000001", "000000003000"))
    assert balances(ledger, "acct-a") == (7000, 0)
    summary = apply_clearing(
        ledger, parse_lines(presentment_of("000001", 3000, "clr-1")), HASHER, START
    )
    assert (summary.already_posted, summary.matched) == (1, 0)
    assert balances(ledger, "acct-a") == (7000, 0)


def test_another_cards_stand_in_of_the_same_identity_is_not_taken_for_the_0100(
    tmp_path: Path,
) -> None:
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000900000", "11": "000001"}))  # A: 51
    answer(authorizer, stand_in("000001", "000000003000", **{"2": PAN_B}))  # B's stand-in
    assert balances(ledger, "acct-b") == (10000, 3000)
    [reversal] = answer(
        authorizer,
        request(
            "0400",
            **{
                "4": "000000003000",
                "11": "000002",
                "2": PAN_B,
                "90": original_data("0100", "000001"),
            },
        ),
    )
    assert (reversal.response_code, reversal.reason) == ("25", "original_not_found")  # A's
    assert balances(ledger, "acct-b") == (10000, 3000)  # B's hold stands


def test_a_stand_in_converted_here_with_field_51_alone_says_what_it_held(tmp_path: Path) -> None:
    """Field 51 the account's but no field 6: converted by this processor all the same."""
    rules = ProgrammeRules(rates={("JPY", "EUR"): Decimal("0.006")}, catalog=default_catalog())
    _, authorizer = build(tmp_path, rules)
    [advice] = answer(authorizer, stand_in("000001", "000000010000", **{"49": "392", "51": "978"}))
    assert advice.fields["6"] == "000000006000"


def test_a_stand_in_past_twelve_digits_converted_is_held_all_the_same(tmp_path: Path) -> None:
    """The network approved: the advice is held, only fields 6 and 51 cannot say it; and a
    partial reversal, which cannot be put in the account's currency without them, leaves
    the hold whole (it released nearly all of it, field 95 read as euros)."""
    rules = ProgrammeRules(rates={("USD", "EUR"): Decimal("1000000")}, catalog=default_catalog())
    ledger, authorizer = build(tmp_path, rules)
    [advice] = answer(authorizer, stand_in("000001", "000010000000", **{"49": "840"}))
    assert advice.reason == "stand_in_overdrawn" and "6" not in advice.fields
    assert balances(ledger, "acct-a") == (10000, 10**13)
    [reversal] = answer(
        authorizer,
        request(
            "0420",
            **{
                "4": "000010000000",
                "49": "840",
                "11": "000002",
                "90": original_data("0120", "000001"),
                "95": "000005000000" + "0" * 30,
            },
        ),
    )
    assert reversal.reason == "reversal_no_change"
    assert balances(ledger, "acct-a") == (10000, 10**13)


def test_an_advice_after_its_purchase_was_posted_holds_nothing(tmp_path: Path) -> None:
    """A completion (naming the declined 0100, or with no field 90) posted the purchase
    before the network's 0120 came: the stand-in held it a second time until it expired."""
    for number, by_field_90 in enumerate((True, False)):
        ledger, authorizer = build(tmp_path / str(number))
        if by_field_90:
            answer(authorizer, request(**{"4": "000000900000", "11": "000001"}))  # 51
        [posted] = answer(
            authorizer, completion_of("000001", "000000003000", by_field_90=by_field_90)
        )
        assert posted.reason == "force_post"
        [advice] = answer(authorizer, stand_in("000001", "000000003000"))
        assert advice.reason == "advice_of_posted_purchase", by_field_90
        assert balances(ledger, "acct-a") == (7000, 0), by_field_90
        summary = apply_clearing(
            ledger, parse_lines(presentment_of("000001", 3000, "clr-1")), HASHER, START
        )
        assert (summary.already_posted, summary.force_posted, summary.matched) == (1, 0, 0)
        assert balances(ledger, "acct-a") == (7000, 0), by_field_90


def test_converted_reversals_and_completions_say_what_they_moved_on_the_account(
    tmp_path: Path,
) -> None:
    """An approval of 10,000 JPY held 60.00 EUR and its event said so; the partial reversal
    that released 30.00 EUR, the completion that posted 24.00 EUR and the force post of
    5,000 JPY (30.00 EUR) said only their yen: a receiver had no figure in the account's
    money but the balances' differences."""
    rules = ProgrammeRules(rates={("JPY", "EUR"): Decimal("0.006")}, catalog=default_catalog())
    ledger, authorizer = build(tmp_path, rules)
    yen = {"49": "392"}
    answer(authorizer, request(**{"4": "000000010000", "11": "000001", **yen}))
    assert last_event_billing(ledger) == (6000, 10000)
    reversal = {"4": "000000010000", "11": "000002", "90": original_data("0100", "000001")}
    [reversed_in_part] = answer(
        authorizer, request("0400", **reversal, **yen, **{"95": "000000005000" + "0" * 30})
    )
    assert reversed_in_part.reason == "partially_reversed"
    assert last_event_billing(ledger) == (3000, 10000)
    [captured] = answer(
        authorizer,
        request(
            "0220",
            **{"4": "000000004000", "11": "000003", "90": original_data("0100", "000001")},
            **yen,
        ),
    )
    assert captured.reason == "captured"
    assert last_event_billing(ledger) == (2400, 4000)
    [posted] = answer(authorizer, request("0220", **{"4": "000000005000", "11": "000004"}, **yen))
    assert posted.reason == "force_post"
    assert last_event_billing(ledger) == (3000, 5000)
    assert balances(ledger, "acct-a") == (10000 - 2400 - 3000, 0)


def test_a_reversal_in_part_says_what_it_gave_back(tmp_path: Path) -> None:
    """In the account's own currency, a reversal down to 40.00 of a 100.00 hold released
    60.00; its event said 100.00 (field 4) and nothing of the 60.00. A whole reversal's field
    4 is what it released, and its event says no more."""
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request(**{"4": "000000010000", "11": "000001"}))
    reversal = {"4": "000000010000", "90": original_data("0100", "000001")}
    [shrunk] = answer(
        authorizer, request("0400", **reversal, **{"11": "000002", "95": "000000004000" + "0" * 30})
    )
    assert shrunk.reason == "partially_reversed"
    assert last_event_billing(ledger) == (6000, 10000)
    [released] = answer(authorizer, request("0400", **reversal, **{"11": "000003"}))
    assert released.reason == "reversed"
    assert last_event_billing(ledger) == (4000, 10000)
    answer(authorizer, request(**{"4": "000000001000", "11": "000004", "37": "000000000009"}))
    [whole] = answer(
        authorizer,
        request(
            "0400", **{"4": "000000001000", "11": "000005", "90": original_data("0100", "000004")}
        ),
    )
    assert whole.reason == "reversed"
    assert last_event_billing(ledger) == (None, 1000)
    assert balances(ledger, "acct-a") == (10000, 0)


def test_a_reversal_after_a_force_post_gives_back_nothing(tmp_path: Path) -> None:
    """A 0220 or a presentment posted 30.00 for an authorisation never seen (or for a balance
    inquiry's identity): the 0400 of that authorisation then credited the 30.00 back, as if
    it were a 0200, though the merchant is paid. A reversal after a capture changes nothing;
    after a force post it must not either."""
    reversal = request(
        "0400", **{"4": "000000003000", "11": "000002", "90": original_data("0100", "000001")}
    )
    for how in ("completion", "presentment", "inquiry"):
        ledger, authorizer = build(tmp_path / how)
        if how == "inquiry":
            [inquiry] = answer(authorizer, request(**{"3": "310000", "11": "000001"}))
            assert inquiry.response_code == "00"
        if how == "presentment":
            summary = apply_clearing(
                ledger, parse_lines(presentment_of("000001", 3000, "clr-1")), HASHER, START
            )
            assert summary.force_posted == 1
        else:
            [posted] = answer(authorizer, completion_of("000001", "000000003000", by_field_90=True))
            assert posted.reason == "force_post", how
        assert balances(ledger, "acct-a") == (7000, 0), how
        [reversed_] = answer(authorizer, reversal)
        assert (reversed_.response_code, reversed_.reason) == ("00", "already_resolved"), how
        assert balances(ledger, "acct-a") == (7000, 0), how


def test_a_reversal_of_a_0200_still_credits_it_back(tmp_path: Path) -> None:
    ledger, authorizer = build(tmp_path)
    [posted] = answer(authorizer, request("0200", **{"4": "000000003000", "11": "000001"}))
    assert posted.reason == "approved"
    assert balances(ledger, "acct-a") == (7000, 0)
    [reversed_] = answer(
        authorizer,
        request(
            "0400", **{"4": "000000003000", "11": "000002", "90": original_data("0200", "000001")}
        ),
    )
    assert reversed_.reason == "reversed"
    assert balances(ledger, "acct-a") == (10000, 0)


def in_dollars_since(
    tmp_path: Path, count_limit: str, loaded_ms: int, changed_ms: int
) -> Authorizer:
    """acct-a loaded in EUR at `loaded_ms` with its card's one `count_limit`, then changed to
    USD by a load at `changed_ms`: an Authorizer on that ledger."""
    controlled = LOAD.replace(
        b'account = "acct-a"\nexpiry = "3012"\n',
        b'account = "acct-a"\nexpiry = "3012"\n'
        + f"controls.count_limits = [{count_limit}]\n".encode(),
        1,
    )
    assert controlled != LOAD
    ledger = Ledger(tmp_path / "ledger", durability="process", map_size_bytes=64 << 20)
    apply_load_file(ledger, parse_load_file(controlled, "test"), HASHER, "test", now_ms=loaded_ms)
    dollars = controlled.replace(
        b'id = "acct-a"\ncurrency = "EUR"', b'id = "acct-a"\ncurrency = "USD"'
    )
    apply_load_file(ledger, parse_load_file(dollars, "test"), HASHER, "test", now_ms=changed_ms)
    return Authorizer(
        ledger, HASHER, ProgrammeRules(catalog=default_catalog()), hold_lifetime_seconds=86400
    )


def test_a_reversal_gives_back_the_approval_to_a_trailing_window_after_a_currency_change(
    tmp_path: Path,
) -> None:
    """A load changed the account's currency while a batch, its clock read before, waited:
    the approval's answer was timed past the load (so that it reads as of the new currency)
    but its usage at the batch's clock, and the full reversal, looking for that exact time,
    left the approval in the card's one-an-hour window: the next purchase was declined 65."""
    start_ms = int(START.timestamp() * 1000)
    authorizer = in_dollars_since(
        tmp_path, "{ count = 1, window_seconds = 3600 }", start_ms, start_ms + 5000
    )
    usd = {"49": "840", "4": "000000003000"}
    [approved] = authorizer.authorize_batch([request(**usd, **{"11": "000001"})], START)
    assert approved.response_code == "00", approved.reason
    [reversed_] = authorizer.authorize_batch(
        [request("0400", **usd, **{"11": "000002", "90": original_data("0100", "000001")})],
        START + timedelta(seconds=10),
    )
    assert reversed_.reason == "reversed"
    [again] = authorizer.authorize_batch(
        [request(**usd, **{"11": "000003"})], START + timedelta(seconds=20)
    )
    assert (again.response_code, again.reason) == ("00", "approved")


def test_an_original_after_its_reversal_holds_nothing(tmp_path: Path) -> None:
    """A network sends its 0420 when the 0100 timed out, and the two may cross: the 0420
    was an orphan, then the 0100 was approved and held 30.00 until the hold expired, a
    week, for a purchase the acquirer had reversed. Nor may the stand-in's advice hold it."""
    for late in ("0100", "0120"):
        ledger, authorizer = build(tmp_path / late)
        reversal = request(
            "0420", **{"4": "000000003000", "11": "000002", "90": original_data("0100", "000001")}
        )
        original = (
            request(**{"4": "000000003000", "11": "000001"})
            if late == "0100"
            else stand_in("000001", "000000003000")
        )
        # In one batch, the reversal first: as they reach the daemon when they cross.
        [orphan, refused] = answer(authorizer, reversal, original)
        assert (orphan.response_code, orphan.reason) == ("00", "orphan_reversal")
        expected = ("94", "late_original") if late == "0100" else ("00", "advice_after_reversal")
        assert (refused.response_code, refused.reason) == expected, late
        assert balances(ledger, "acct-a") == (10000, 0), late
        with ledger.read() as reader:
            assert reader.account_holds("acct-a") == [], late
    # A 0400 answered 25 leaves the same mark; an original seen first is reversed as ever.
    ledger, authorizer = build(tmp_path / "0400")
    [missing] = answer(
        authorizer,
        request(
            "0400", **{"4": "000000003000", "11": "000002", "90": original_data("0100", "000001")}
        ),
    )
    assert (missing.response_code, missing.reason) == ("25", "original_not_found")
    [late] = answer(authorizer, request(**{"4": "000000003000", "11": "000001"}))
    assert (late.response_code, late.reason) == ("94", "late_original")
    assert balances(ledger, "acct-a") == (10000, 0)


def test_a_reversal_mark_refuses_its_own_cards_original_only_and_stays_an_orphan(
    tmp_path: Path,
) -> None:
    """The mark an early reversal leaves: another card's 0100 of the same identity was
    declined 94 for it, and a second reversal of the unseen original took the mark for a
    declined original (00 original_declined instead of 25, or an orphan's acknowledgement)."""
    ledger, authorizer = build(tmp_path)
    names_it = {"4": "000000003000", "90": original_data("0100", "000001")}
    [orphan] = answer(authorizer, request("0420", **names_it, **{"11": "000002"}))
    assert orphan.reason == "orphan_reversal"
    [again] = answer(authorizer, request("0400", **names_it, **{"11": "000003"}))
    assert (again.response_code, again.reason) == ("25", "original_not_found")
    [advice] = answer(authorizer, request("0420", **names_it, **{"11": "000004"}))
    assert (advice.response_code, advice.reason) == ("00", "orphan_reversal")
    [other] = answer(authorizer, request(**{"2": PAN_B, "4": "000000003000", "11": "000001"}))
    assert (other.response_code, other.reason) == ("00", "approved")
    assert balances(ledger, "acct-b") == (10000, 3000)
    assert balances(ledger, "acct-a") == (10000, 0)


def test_a_reversal_gives_back_the_days_count_it_was_counted_in_after_a_currency_change(
    tmp_path: Path,
) -> None:
    """The approval's usage was counted on the 24th at the batch's clock, its answer timed on
    the 25th past a load of 00:00:04; its reversal gave the count back to the 25th, and the
    card's one approval a day then let two through on the 25th. Now the usage is counted when
    the answer says, and given back there."""
    midnight = datetime(2026, 11, 25, tzinfo=UTC)
    midnight_ms = int(midnight.timestamp() * 1000)
    authorizer = in_dollars_since(
        tmp_path, '{ count = 1, interval = "daily" }', midnight_ms - 60_000, midnight_ms + 4000
    )
    usd = {"49": "840", "4": "000000001000"}
    before = midnight - timedelta(seconds=1)  # the batch's clock, read before the load
    [first] = authorizer.authorize_batch([request(**usd, **{"11": "000001"})], before)
    # It counts on the day its answer says: the 25th, as the load's time.
    [second] = authorizer.authorize_batch(
        [request(**usd, **{"11": "000002"})], midnight + timedelta(seconds=10)
    )
    assert [first.reason, second.reason] == ["approved", "daily_count_limit"]
    [reversed_] = authorizer.authorize_batch(
        [request("0400", **usd, **{"11": "000003", "90": original_data("0100", "000001")})],
        midnight + timedelta(seconds=20),
    )
    assert reversed_.reason == "reversed"
    # Given back to the 25th, where it counted: one approval that day again, and no more.
    third, fourth = (
        authorizer.authorize_batch(
            [request(**usd, **{"11": stan})], midnight + timedelta(seconds=seconds)
        )[0]
        for stan, seconds in (("000004", 30), ("000005", 40))
    )
    assert (third.reason, fourth.reason) == ("approved", "daily_count_limit")


def test_a_completion_of_a_reversed_0200_posts_what_no_longer_stands(tmp_path: Path) -> None:
    """Acknowledged as already posted, the reversal's credit stood though the network says the
    purchase completed: as over a released hold, its word stands, once."""
    ledger, authorizer = build(tmp_path)
    answer(authorizer, request("0200", **{"4": "000000003000", "11": "000001"}))
    answer(
        authorizer,
        request(
            "0400", **{"4": "000000003000", "11": "000002", "90": original_data("0200", "000001")}
        ),
    )
    assert balances(ledger, "acct-a") == (10000, 0)
    for stan, reason in (("000003", "force_post"), ("000004", "already_posted")):
        [completion] = answer(
            authorizer,
            request(
                "0220", **{"4": "000000003000", "11": stan, "90": original_data("0200", "000001")}
            ),
        )
        assert completion.reason == reason
        assert balances(ledger, "acct-a") == (7000, 0)
