"""`processor ledger verify`: the ledger's invariants, checked over one read transaction.

What must hold in any ledger the processor wrote, however it stopped (a restored backup, after
a kill -9, after a migration):

- each account's `held` is the sum of its open holds, and `open_holds` their count;
- every hold (kept in the answer that opened it) names an account that exists, and no two
  answers keep the same hold;
- the hold expiry index lists exactly the open holds, each at its expiry;
- every answer that names a hold it did not open (a reversal's, a completion's) names one
  that exists, of the same account, unless retention pruned the answer that kept it;
- the outbox's sequences run from 1 (or from after the last event retention pruned) without a
  gap, and each account's events are numbered 1, 2, ... (or on from its first one kept) up to
  the account's `event_sequence`, none missing or repeated; the event counter is not behind
  the last event (the next write would fail on it);
- every RRN index entry names an answer that is kept (a reversal without field 90 would
  find nothing, or a key used again a year on);
- every card's account exists, and the card-id and account-cards indexes list exactly the
  cards (the API finds a card by id, an account's cards by the second: an entry missing hides
  a card, one too many shows another's), and each card state beside an account is of a card
  of that account (one left behind by a move would be read again if the card came back);
- each account's ledger entries (funding, debits; never pruned) are numbered 1, 2, ... up to
  its `entry_sequence`, none missing or repeated, each of a positive amount.

A read transaction does not block the daemon's writers, so this runs beside a serving daemon;
it walks every record, so it takes time on a large ledger and keeps the pages it reads from
being reused until it ends.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import msgspec

from processor.ledger.records import Account
from processor.ledger.store import Reader

PROBLEMS_LISTED_MAX = 50  # problems named one by one; the rest are counted


class Verified(msgspec.Struct, frozen=True, kw_only=True):
    accounts: int
    holds: int
    open_holds: int
    answers: int
    events: int
    cards: int
    problems: list[str]  # at most PROBLEMS_LISTED_MAX, named
    problems_total: int


def verify(reader: Reader) -> Verified:
    problems: list[str] = []
    total = 0

    def problem(text: str) -> None:
        nonlocal total
        total += 1
        if len(problems) < PROBLEMS_LISTED_MAX:
            problems.append(text)

    accounts = {account.id: account for account in reader.accounts()}
    held: Counter[str] = Counter()
    open_count: Counter[str] = Counter()
    hold_accounts: dict[int, str] = {}
    open_expiry: dict[int, tuple[int, bytes]] = {}  # open hold -> (expiry, its answer's key)
    holds = 0
    for hold in reader.all_holds():
        holds += 1
        if hold.hold_id in hold_accounts:
            problem(f"hold {hold.hold_id}: kept by two answers (one is {hold.identity!r})")
        hold_accounts[hold.hold_id] = hold.account_id
        if hold.account_id not in accounts:
            problem(f"hold {hold.hold_id}: its account {hold.account_id!r} does not exist")
        if hold.status == "open":
            held[hold.account_id] += hold.amount
            open_count[hold.account_id] += 1
            open_expiry[hold.hold_id] = (hold.expires_ms, hold.identity)
    for account in accounts.values():
        if account.held != held[account.id]:
            problem(
                f"account {account.id}: held {account.held}, but its open holds add up to "
                f"{held[account.id]}"
            )
        if account.open_holds != open_count[account.id]:
            problem(
                f"account {account.id}: {account.open_holds} open holds recorded, "
                f"{open_count[account.id]} found"
            )
    # The expiry index lists exactly the open holds: one missing would never expire, one too
    # many would expire a hold twice.
    for expires_ms, hold_id, identity in reader.hold_expiry_index():
        if open_expiry.pop(hold_id, None) != (expires_ms, identity):
            problem(f"hold expiry index: hold {hold_id} at {expires_ms} ms is not an open hold")
    for hold_id in open_expiry:
        problem(f"hold {hold_id}: open, but not in the hold expiry index")

    answers = 0
    pruned_hold_max = reader.pruned_hold_max()  # holds up to it may have been pruned
    for answer in reader.all_answers():
        answers += 1
        # A reversal's or completion's answer names the hold it acted on: that must exist.
        if answer.hold_id is not None and answer.hold is None:
            owner = hold_accounts.get(answer.hold_id)
            if owner is None and answer.hold_id <= pruned_hold_max:
                continue  # kept by an answer retention has pruned, older than this one
            if owner is None:
                problem(
                    f"an answer ({answer.answered_ms} ms) names hold {answer.hold_id}: not found"
                )
            elif answer.account_id is not None and owner != answer.account_id:
                problem(
                    f"hold {answer.hold_id}: of account {owner!r}, but an answer about it "
                    f"names {answer.account_id!r}"
                )

    events = 0
    # Retention cuts the outbox from its start: it then begins after the last event pruned,
    # and an account's first event kept may have any number.
    pruned_through = reader.events_pruned_through()
    expected = pruned_through + 1
    # An account's events are numbered as they are appended: in outbox order, each one more.
    numbered: dict[str, int] = {}  # account -> the last number seen
    for sequence, account_id, account_sequence in reader.outbox_entries():
        events += 1
        if sequence != expected:
            problem(f"outbox: sequence {sequence} follows {expected - 1} (a gap or a repeat)")
        expected = sequence + 1
        if account_id is not None:
            last = numbered.get(account_id)
            if last is None and pruned_through:
                last = account_sequence - 1  # its earlier events may have been pruned
            last = last or 0
            if account_sequence != last + 1:
                problem(
                    f"account {account_id}: event {sequence} is its number {account_sequence}, "
                    f"after {last}"
                )
            numbered[account_id] = account_sequence
    for account in accounts.values():
        last = numbered.get(account.id)
        if last is None and pruned_through:
            continue  # all of its events may have been pruned
        if (last or 0) != account.event_sequence:
            problem(
                f"account {account.id}: its events are numbered up to {last or 0}, the account "
                f"says {account.event_sequence}"
            )
    for account_id in numbered.keys() - accounts.keys():
        problem(f"account {account_id}: has events but no record")
    numbered_events = reader.events_numbered()
    if expected - 1 > numbered_events:
        problem(
            f"outbox: events up to {expected - 1}, but the ledger has numbered {numbered_events}"
        )
    for lookup, answer_key in reader.rrn_entries():
        if reader.answer(answer_key) is None:
            problem(
                f"RRN index: {lookup.decode(errors='replace')} names "
                f"{answer_key.decode(errors='replace')}, which is not kept"
            )
    cards = _check_cards(reader, accounts, problem)
    _check_entries(reader, accounts, problem)
    return Verified(
        accounts=len(accounts),
        holds=holds,
        open_holds=sum(open_count.values()),
        answers=answers,
        events=events,
        cards=cards,
        problems=problems,
        problems_total=total,
    )


def _check_cards(
    reader: Reader, accounts: dict[str, Account], problem: Callable[[str], None]
) -> int:
    """The cards against their accounts, their two indexes and the card states; their count."""
    by_key = dict(reader.cards_by_key())
    by_id = {card.card_id: card for card in by_key.values()}
    listed = set(reader.account_card_index())
    for key, card in by_key.items():
        if card.account_id not in accounts:
            problem(f"card {card.card_id}: its account {card.account_id!r} does not exist")
        if (card.account_id, key) not in listed:
            problem(f"card {card.card_id}: not listed among its account's cards")
    for account_id, key in sorted(listed):
        of_key = by_key.get(key)
        if of_key is None or of_key.account_id != account_id:
            named = "no card" if of_key is None else f"card {of_key.card_id}"
            problem(f"account {account_id}: its cards list {named}, not one of its own")
    indexed: set[str] = set()
    for card_id, key in reader.card_id_index():
        indexed.add(card_id)
        of_key = by_key.get(key)
        if of_key is None or of_key.card_id != card_id:
            problem(f"card id index: {card_id} names no card of that id")
    for card_id in sorted(by_id.keys() - indexed):
        problem(f"card {card_id}: missing from the card id index")
    for account_id, card_id in reader.card_state_owners():
        owner = by_id.get(card_id)
        if owner is None or owner.account_id != account_id:
            problem(f"account {account_id}: keeps a state of card {card_id}, not one of its cards")
    return len(by_key)


def _check_entries(
    reader: Reader, accounts: dict[str, Account], problem: Callable[[str], None]
) -> None:
    """Each account's ledger entries numbered 1 up to its entry_sequence, none missing."""
    last: dict[str, int] = {}
    for account_id, number, entry in reader.all_entries():
        before = last.get(account_id, 0)
        if number != before + 1 or entry.sequence != number:
            problem(
                f"account {account_id}: ledger entry {entry.sequence} (kept as {number}) "
                f"follows {before}"
            )
        if entry.amount <= 0:
            problem(f"account {account_id}: ledger entry {entry.sequence} of {entry.amount}")
        last[account_id] = number
    for account_id in sorted(last.keys() - accounts.keys()):
        problem(f"account {account_id}: has ledger entries but no record")
    for account in accounts.values():
        if last.get(account.id, 0) != account.entry_sequence:
            problem(
                f"account {account.id}: its ledger entries go up to {last.get(account.id, 0)}, "
                f"the account says {account.entry_sequence}"
            )
