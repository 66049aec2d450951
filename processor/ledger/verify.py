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
  find nothing, or a key used again a year on).

A read transaction does not block the daemon's writers, so this runs beside a serving daemon;
it walks every record, so it takes time on a large ledger and keeps the pages it reads from
being reused until it ends.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from processor.ledger.store import Reader

PROBLEMS_LISTED_MAX = 50  # problems named one by one; the rest are counted


class Verified(msgspec.Struct, frozen=True, kw_only=True):
    accounts: int
    holds: int
    open_holds: int
    answers: int
    events: int
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
    return Verified(
        accounts=len(accounts),
        holds=holds,
        open_holds=sum(open_count.values()),
        answers=answers,
        events=events,
        problems=problems,
        problems_total=total,
    )
