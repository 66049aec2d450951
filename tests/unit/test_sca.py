"""PSD2 strong customer authentication: soft declines, exemptions, the low-value count."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from support import authorization, demo_ledger

from processor.authorizer import Authorizer, Outcome
from processor.engine import ProgrammeRules
from processor.ledger.controls import Controls, StrongAuthentication
from processor.ledger.records import CardState
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest

HASHER = PanHasher(b"sca-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
VISA = "4761739001010085"  # demo-main
PSD2 = StrongAuthentication(
    currency="EUR", low_value_max=3_000, low_value_total_max=10_000, low_value_count_max=5
)
ONLINE = {"22": "810", "25": "59"}
AUTHENTICATED = "R4203212"  # field 48: subelement 42, position 3 = 2 (3-D Secure)


def message(
    stan: str, amount: int, additional: str | None = None, **fields: str
) -> AuthorizationRequest:
    extra = {"48": additional} if additional is not None else {}
    return authorization(VISA, stan, amount, **(fields or ONLINE), **extra)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = demo_ledger(tmp_path, HASHER)
    with ledger.write() as writer:
        writer.put_programme_controls(Controls(require_sca=PSD2))
    yield ledger
    ledger.close()


def answer(ledger: Ledger, request: AuthorizationRequest) -> Outcome:
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
    [outcome] = authorizer.authorize_batch([request], NOW)
    return outcome


def state(ledger: Ledger, pan: str = VISA) -> CardState:
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(pan))
        assert card is not None
        return reader.card_state(card)


def test_unauthenticated_e_commerce_above_low_value_is_soft_declined_1a(ledger: Ledger) -> None:
    outcome = answer(ledger, message("000001", 5_000))
    assert (outcome.response_code, outcome.reason) == ("1A", "sca_required")
    # The merchant retries with 3-D Secure: approved.
    assert answer(ledger, message("000002", 5_000, AUTHENTICATED)).response_code == "00"


def test_a_mastercard_style_card_gets_65(ledger: Ledger) -> None:
    with ledger.write() as writer:  # demo-main's card renumbered into a 5-series BIN
        card = writer.card(HASHER.card_key(VISA))
        assert card is not None
        other = "5200000000001005"
        writer.put_card(
            HASHER.card_key(other),
            msgspec.structs.replace(card, card_id="card_mc", bin="520000"),
            None,
        )
    outcome = answer(ledger, msgspec.structs.replace(message("000003", 5_000), pan=other))
    assert (outcome.response_code, outcome.reason) == ("65", "sca_required")


def test_low_value_is_exempt_until_five_or_100_eur_then_authentication_resets(
    ledger: Ledger,
) -> None:
    for n in range(5):
        assert answer(ledger, message(f"00001{n}", 1_000)).response_code == "00"
    assert (state(ledger).sca_exempt_count, state(ledger).sca_exempt_amount) == (5, 5_000)
    # The sixth low-value payment in a row needs authentication.
    assert answer(ledger, message("000020", 1_000)).reason == "sca_required"
    assert answer(ledger, message("000021", 1_000, AUTHENTICATED)).response_code == "00"
    assert (state(ledger).sca_exempt_count, state(ledger).sca_exempt_amount) == (0, 0)
    # And by amount: 3 x 30 EUR, then 20 EUR would pass 100 EUR.
    for n in range(3):
        assert answer(ledger, message(f"00003{n}", 3_000)).response_code == "00"
    assert answer(ledger, message("000040", 2_000)).reason == "sca_required"
    assert answer(ledger, message("000041", 1_000)).response_code == "00"  # 100 EUR exactly


def test_out_of_scope_and_card_present_need_no_authentication(ledger: Ledger) -> None:
    assert answer(ledger, message("000050", 5_000, "R2202" + "01")).response_code == "00"  # MIT
    assert answer(ledger, message("000051", 5_000, "R2202" + "02")).response_code == "00"
    chip = {"22": "051", "25": "00"}
    assert answer(ledger, message("000052", 5_000, None, **chip)).response_code == "00"
    attempted = "R4203211"  # 3-D Secure attempted, not authenticated: not SCA
    assert answer(ledger, message("000053", 5_000, attempted)).reason == "sca_required"
    assert state(ledger).sca_exempt_count == 0  # none of these used the exemption


def test_a_threshold_and_a_rule_in_another_currency(ledger: Ledger) -> None:
    with ledger.write() as writer:
        writer.put_programme_controls(
            Controls(require_sca=StrongAuthentication(currency="EUR", above=10_000))
        )
    assert answer(ledger, message("000060", 10_000)).response_code == "00"
    assert answer(ledger, message("000061", 10_001)).reason == "sca_required"
    with ledger.write() as writer:  # a rule for USD accounts does not touch EUR ones
        writer.put_programme_controls(Controls(require_sca=StrongAuthentication(currency="USD")))
    assert answer(ledger, message("000062", 10_001)).response_code == "00"


def test_a_card_with_too_little_money_is_declined_51_not_sent_to_authenticate(
    ledger: Ledger,
) -> None:
    low = "4761739001010069"  # demo-low: 50.00 EUR
    request = msgspec.structs.replace(message("000070", 9_000), pan=low)
    assert answer(ledger, request).reason == "insufficient_funds"


def test_a_count_alone_bounds_the_exemption(ledger: Ledger) -> None:
    with ledger.write() as writer:
        writer.put_programme_controls(
            Controls(
                require_sca=StrongAuthentication(
                    currency="EUR", low_value_max=3_000, low_value_count_max=2
                )
            )
        )
    assert answer(ledger, message("000080", 3_000)).response_code == "00"
    assert answer(ledger, message("000081", 3_000)).response_code == "00"
    assert answer(ledger, message("000082", 100)).reason == "sca_required"  # the third


def test_a_partial_approval_is_weighed_at_the_payments_amount(ledger: Ledger) -> None:
    """50.00 asked on a card with 25.00 available, partial approvals welcome: the thresholds
    weighed the 25.00 held, so a payment above the low-value limit went through exempt."""
    low = "4761739001010069"  # demo-low: 50.00 EUR
    with ledger.write() as writer:
        account = writer.account("demo-low")
        assert account is not None
        account.posted = 2_500
        writer.put_account(account)
    partial = "R" + "61" + "03" + "100"  # field 48: the terminal takes a partial approval
    request = msgspec.structs.replace(message("000090", 5_000, partial), pan=low)
    assert answer(ledger, request).reason == "sca_required"


def test_a_stored_exemption_with_no_cap_exempts_nothing(ledger: Ledger) -> None:
    """Controls stored before such rules were refused: every low-value payment went
    through exempt, without end."""
    with ledger.write() as writer:
        writer.put_programme_controls(
            Controls(require_sca=StrongAuthentication(currency="EUR", low_value_max=3_000))
        )
    assert answer(ledger, message("000095", 500)).reason == "sca_required"
