"""`processor ledger show`: balances, open holds and card state as a person reads them."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from processor.currency import UnknownCurrency, alpha_code, exponent
from processor.ledger.controls import NO_CONTROLS, Controls
from processor.ledger.records import Account, Card
from processor.ledger.store import Reader


def money(amount: int, currency: str) -> str:
    try:
        digits = exponent(currency)
    except UnknownCurrency:
        return f"{amount} {currency}"
    if digits == 0:
        return f"{amount} {currency}"
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(amount), 10**digits)
    return f"{sign}{whole}.{fraction:0{digits}d} {currency}"


def _age(milliseconds: int) -> str:
    seconds = max(0, milliseconds // 1000)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def describe_account(reader: Reader, account: Account, now: datetime) -> list[str]:
    now_ms = int(now.timestamp() * 1000)
    c = account.currency
    lines = [
        f"account {account.id}  status {account.status}  currency {c}",
        f"  posted       {money(account.posted, c):>24}",
        f"  held         {money(account.held, c):>24}",
        f"  credit limit {money(account.credit_limit, c):>24}",
        f"  available    {money(account.available, c):>24}",
        f"  controls     {describe_controls(account.controls)}",
    ]
    holds = reader.account_holds(account.id)
    total = reader.account_hold_count(account.id)
    shown = "" if total == len(holds) else f" (oldest {len(holds)} listed)"
    lines.append(f"  open holds: {total}{shown}")
    for hold in holds:
        expires = datetime.fromtimestamp(hold.expires_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(
            f"    hold {hold.hold_id:>8}  {money(hold.amount, hold.currency):>18}  "
            f"approval {hold.approval_code}  mcc {hold.mcc}  age {_age(now_ms - hold.created_ms)}  "
            f"expires {expires}Z"
        )
    cards = reader.account_cards(account.id)
    lines.append(f"  cards: {len(cards)}")
    for card in cards:
        lines.append("    " + describe_card(card))
    return lines


RECENT_MAX = 20


def describe_history(reader: Reader, card: Card, limit: int = RECENT_MAX) -> list[str]:
    """The card's latest answered messages: when, MTI, amount, answer, reason, approval code."""
    history = reader.card_history(card.card_id, limit)
    lines = [f"  recent transactions of {card.masked_pan}: {len(history)}"]
    for _, answer in history:
        fields = answer.response
        when = datetime.fromtimestamp(answer.answered_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        currency = alpha_code(fields.get("49", "")) or fields.get("49", "?")
        amount = fields.get("4", "")
        shown = money(int(amount), currency) if amount.isdigit() and currency != "?" else "-"
        approval = f"  approval {fields['38']}" if "38" in fields else ""
        lines.append(
            f"    {when}Z  {answer.mti or '?':4}  {shown:>18}  {answer.response_code} "
            f"{answer.reason}{approval}"
        )
    return lines


def describe_card(card: Card) -> str:
    return (
        f"card {card.card_id}  {card.masked_pan}  status {card.status}  expiry {card.expiry}  "
        f"controls {describe_controls(card.controls)}"
    )


def describe_controls(controls: Controls | None) -> str:
    """One line, only what is set: JSON of the fields that differ from no controls."""
    if controls is None or controls.empty:
        return "none"
    set_fields = {
        name: value
        for name, value in msgspec.structs.asdict(controls).items()
        if value != getattr(NO_CONTROLS, name)
    }
    return msgspec.json.encode(set_fields).decode()
