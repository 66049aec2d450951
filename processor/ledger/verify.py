"""`processor ledger verify`: the ledger's invariants, checked over one read transaction.

What must hold in any ledger the processor wrote, however it stopped (a restored backup, after
a kill -9, after a migration):

- each account's `held` is the sum of its open holds, and `open_holds` their count;
- every hold names an account that exists;
- every answer that opened a hold names a hold that exists, of the same account;
- the outbox's sequences run from 1 without a gap, and each account's events are numbered
  1, 2, ... up to the account's `event_sequence`, none missing or repeated.

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
    holds = 0
    for hold in reader.all_holds():
        holds += 1
        hold_accounts[hold.hold_id] = hold.account_id
        if hold.account_id not in accounts:
            problem(f"hold {hold.hold_id}: its account {hold.account_id!r} does not exist")
        if hold.status == "open":
            held[hold.account_id] += hold.amount
            open_count[hold.account_id] += 1
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

    answers = 0
    for answer in reader.all_answers():
        answers += 1
        if answer.hold_id is None:
            continue
        owner = hold_accounts.get(answer.hold_id)
        if owner is None:
            problem(f"an answer ({answer.answered_ms} ms) names hold {answer.hold_id}: not found")
        elif answer.account_id is not None and owner != answer.account_id:
            problem(
                f"hold {answer.hold_id}: of account {owner!r}, but its answer names "
                f"{answer.account_id!r}"
            )

    events = 0
    expected = 1
    # An account's events are numbered as they are appended: in outbox order, each one more.
    numbered: dict[str, int] = {}  # account -> the last number seen
    for sequence, account_id, account_sequence in reader.outbox_entries():
        events += 1
        if sequence != expected:
            problem(f"outbox: sequence {sequence} follows {expected - 1} (a gap or a repeat)")
        expected = sequence + 1
        if account_id is not None:
            last = numbered.get(account_id, 0)
            if account_sequence != last + 1:
                problem(
                    f"account {account_id}: event {sequence} is its number {account_sequence}, "
                    f"after {last}"
                )
            numbered[account_id] = account_sequence
    for account in accounts.values():
        last = numbered.get(account.id, 0)
        if last != account.event_sequence:
            problem(
                f"account {account.id}: its events are numbered up to {last}, the account "
                f"says {account.event_sequence}"
            )
    for account_id in numbered.keys() - accounts.keys():
        problem(f"account {account_id}: has events but no record")
    return Verified(
        accounts=len(accounts),
        holds=holds,
        open_holds=sum(open_count.values()),
        answers=answers,
        events=events,
        problems=problems,
        problems_total=total,
    )
