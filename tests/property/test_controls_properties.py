"""Properties of the spend controls: usage bookkeeping, level precedence, and the Authorizer.

1. Usage never goes negative under any sequence of record_usage and release_usage.
2. Recording an approval and fully releasing it in the same period leaves usage as it was, and
   releasing one approval of a day equals never having recorded it.
3. Partial releases (capped the way the lifecycle caps them) never give back more than was
   recorded.
4. The strictest level wins: for random controls at three levels, check_controls refuses iff some
   level alone refuses, with the reason of the first refusing level in precedence order (kind
   first, then programme, account, card). The expectation comes from an oracle written here from
   specs/controls.md, over a plain list of past approvals, not from check_controls or Usage.
5. Through processor.authorizer.Authorizer on a temporary ledger: random approvals, full and
   partial reversals and clock steps on one card with a daily amount limit and a trailing count
   limit (at card, account or programme level) never approve past a limit, every answer is the
   model's, and reversing everything brings usage back to zero.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from processor.authorizer import Authorizer
from processor.catalog import default_catalog
from processor.engine import ProgrammeRules
from processor.engine.controls import (
    Periods,
    check_controls,
    periods_at,
    record_usage,
    release_usage,
    used,
)
from processor.ledger.controls import (
    CALENDAR_INTERVALS,
    CHANNELS,
    TRAILING_COUNT_MAX,
    AmountLimit,
    Channels,
    Controls,
    CountLimit,
    Usage,
)
from processor.ledger.load import apply_load_file, card_id_for, parse_load_file
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

CATALOG = default_catalog()
NOW_MS = int(datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp() * 1000)  # a Tuesday
DAY_MS = 86_400_000
# MCCs of a few categories, and one in none (pawn shops).
MCCS = ("5411", "5499", "6011", "5812", "7995", "5933")
CATEGORIES = ("groceries", "cash", "restaurants", "gambling")
WINDOWS = (1, 60, 3_600, 86_400)


def category(mcc: str) -> str | None:
    return CATALOG.category(mcc)


def observed(usage: Usage, now: Periods) -> dict[tuple[str, tuple[str, ...]], tuple[int, int]]:
    """Everything a control can read from `usage` at `now`: calendar counters and window counts."""
    seen: dict[tuple[str, tuple[str, ...]], tuple[int, int]] = {}
    for keys in ((), *((c,) for c in CATEGORIES)):
        for interval in CALENDAR_INTERVALS:
            seen[(interval, keys)] = used(usage, interval, now, keys)
        for window in WINDOWS:
            seen[(f"window {window}", keys)] = (trailing_count(usage, now, window, keys), 0)
    return seen


def trailing_count(usage: Usage, now: Periods, window: int, categories: Sequence[str]) -> int:
    """Approvals the trailing window counts, read through check_controls (capped at the largest
    count a window limit may have): a limit of k refuses exactly when at least k were counted."""
    low, high = 0, TRAILING_COUNT_MAX  # the answer is the largest refusing k, in [0, MAX]
    while low < high:
        middle = (low + high + 1) // 2
        limit = CountLimit(count=middle, window_seconds=window, categories=tuple(categories))
        mcc = next((m for m in MCCS if category(m) in categories), "5411")
        refused = check_controls(
            [(Controls(count_limits=(limit,)), usage)],
            mcc=mcc,
            country=None,
            channels=(),
            amount=1,
            currency="EUR",
            periods=now,
            catalog=CATALOG,
        )
        if refused is not None:
            low = middle
        else:
            high = middle - 1
    return low


# --- 1-3: usage bookkeeping ----------------------------------------------------------------------


class Record(NamedTuple):
    amount: int
    mcc: str
    step_ms: int  # after the previous operation


class Release(NamedTuple):
    which: int  # an earlier recorded approval
    amount: int
    full: bool
    step_ms: int


STEP_MS = st.one_of(
    st.just(0), st.integers(0, 120_000), st.integers(0, 3 * DAY_MS), st.sampled_from((DAY_MS,))
)
RECORD = st.builds(Record, st.integers(0, 50_000), st.sampled_from(MCCS), STEP_MS)
RELEASE = st.builds(Release, st.integers(0, 10**6), st.integers(0, 80_000), st.booleans(), STEP_MS)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(RECORD, RELEASE), max_size=40))
def test_usage_never_goes_negative(operations: list[Record | Release]) -> None:
    usage = Usage()
    at = NOW_MS
    recorded: list[tuple[int, str]] = []  # (at_ms, mcc)
    for operation in operations:
        at += operation.step_ms
        now = periods_at(at)
        if isinstance(operation, Record):
            record_usage(usage, operation.amount, category(operation.mcc), now)
            recorded.append((at, operation.mcc))
        elif recorded:
            # Arbitrary releases, even of more than was recorded or of the same approval twice.
            when, mcc = recorded[operation.which % len(recorded)]
            count = 1 if operation.full else 0
            release_usage(usage, operation.amount, count, category(mcc), periods_at(when), now)
        for keys in ((), *((c,) for c in CATEGORIES)):
            for interval in CALENDAR_INTERVALS:
                amount, count = used(usage, interval, now, keys)
                assert amount >= 0 and count >= 0, (interval, keys)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(RECORD, max_size=25),
    st.integers(0, 50_000),
    st.sampled_from(MCCS),
    st.integers(0, 3 * DAY_MS),
)
def test_record_then_full_release_restores_usage(
    history: list[Record], amount: int, mcc: str, later_ms: int
) -> None:
    usage = Usage()
    at = NOW_MS - 3 * DAY_MS
    for item in history:
        at += item.step_ms // 4
        record_usage(usage, item.amount, category(item.mcc), periods_at(at))
    now = periods_at(max(at, NOW_MS) + later_ms)
    before = observed(usage, now)

    record_usage(usage, amount, category(mcc), now)
    release_usage(usage, amount, 1, category(mcc), now, now)

    assert observed(usage, now) == before


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 50_000), st.sampled_from(MCCS), st.integers(0, 3_600_000)),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 10**6),
    st.integers(0, 3_600_000),
)
def test_releasing_one_approval_equals_never_recording_it(
    approvals: list[tuple[int, str, int]], which: int, later_ms: int
) -> None:
    # All on one day (the day of NOW_MS, UTC), in time order.
    start = NOW_MS - 12 * 3_600_000
    times = sorted(start + offset for _, _, offset in approvals)
    dropped = which % len(approvals)
    with_it, without_it = Usage(), Usage()
    for index, ((amount, mcc, _), at) in enumerate(zip(approvals, times, strict=True)):
        record_usage(with_it, amount, category(mcc), periods_at(at))
        if index != dropped:
            record_usage(without_it, amount, category(mcc), periods_at(at))
    now = periods_at(times[-1] + later_ms)
    assert now.daily == periods_at(times[0]).daily

    amount, mcc, _ = approvals[dropped]
    release_usage(with_it, amount, 1, category(mcc), periods_at(times[dropped]), now)

    assert observed(with_it, now) == observed(without_it, now)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(RECORD, max_size=10),
    st.integers(1, 50_000),
    st.sampled_from(MCCS),
    st.lists(st.integers(0, 100_000), max_size=8),
    st.booleans(),
)
def test_partial_releases_never_give_back_more_than_was_recorded(
    others: list[Record], amount: int, mcc: str, partials: list[int], finish: bool
) -> None:
    usage = Usage()
    at = NOW_MS
    for item in others:
        record_usage(usage, item.amount, category(item.mcc), periods_at(at))
        at += 1
    approved = periods_at(at)
    now = periods_at(at + 1_000)
    base = observed(usage, now)
    record_usage(usage, amount, category(mcc), approved)
    keys = [(), *((c,) for c in CATEGORIES if c == category(mcc))]

    remaining = amount
    for asked in partials:
        # The lifecycle gives back at most what the approval still counts.
        given_back = min(asked, remaining)
        release_usage(usage, given_back, 0, category(mcc), approved, now)
        remaining -= given_back
        for key in keys:
            for interval in CALENDAR_INTERVALS:
                base_amount, base_count = base[(interval, key)]
                assert used(usage, interval, now, key) == (base_amount + remaining, base_count + 1)
    if finish:
        release_usage(usage, remaining, 1, category(mcc), approved, now)
        assert observed(usage, now) == base


# --- 4: the strictest level wins -----------------------------------------------------------------

COUNTRIES = ("DE", "FR", "NO", "GB", "US", "CH")
COUNTRY_NAMES = (*COUNTRIES, "eu", "eea")
INTERVALS = ("per_authorization", "daily", "weekly", "monthly", "yearly", "all_time")


def small_tuple(elements: st.SearchStrategy[Any], most: int = 2) -> st.SearchStrategy[Any]:
    return st.lists(elements, max_size=most, unique=True).map(tuple)


def maybe_empty(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly empty: a list set at every level would leave little that passes."""
    return st.one_of(st.just(()), st.just(()), small_tuple(elements))


AMOUNT_LIMITS = st.builds(
    AmountLimit,
    interval=st.sampled_from(INTERVALS),
    amount=st.integers(0, 30_000),
    currency=st.sampled_from(("EUR", "EUR", "EUR", "USD")),
    categories=maybe_empty(st.sampled_from(CATEGORIES)),
)
COUNT_LIMITS = st.one_of(
    st.builds(
        CountLimit,
        count=st.integers(0, 6),
        interval=st.sampled_from(CALENDAR_INTERVALS),
        categories=maybe_empty(st.sampled_from(CATEGORIES)),
    ),
    st.builds(
        CountLimit,
        count=st.integers(0, 6),
        window_seconds=st.sampled_from((60, 3_600, 86_400)),
        categories=maybe_empty(st.sampled_from(CATEGORIES)),
    ),
)
CHANNEL_SWITCHES = st.one_of(
    st.just(Channels()),
    st.builds(Channels, **{name: st.sampled_from((True, True, True, False)) for name in CHANNELS}),
)
CONTROLS = st.one_of(
    st.just(Controls()),
    st.builds(
        Controls,
        amount_limits=maybe_empty(AMOUNT_LIMITS),
        count_limits=maybe_empty(COUNT_LIMITS),
        allowed_categories=maybe_empty(st.sampled_from(CATEGORIES)),
        allowed_mccs=maybe_empty(st.sampled_from(MCCS)),
        blocked_categories=maybe_empty(st.sampled_from(CATEGORIES)),
        blocked_mccs=maybe_empty(st.sampled_from(MCCS)),
        allowed_countries=maybe_empty(st.sampled_from(COUNTRY_NAMES)),
        blocked_countries=maybe_empty(st.sampled_from(COUNTRY_NAMES)),
        channels=CHANNEL_SWITCHES,
    ),
)
# Past approvals (amount, MCC, how long before now in ms), recorded oldest first.
HISTORY = st.lists(
    st.tuples(
        st.integers(1, 8_000),
        st.sampled_from(MCCS),
        st.one_of(st.integers(0, 3_600_000), st.integers(0, 400 * DAY_MS)),
    ),
    max_size=12,
)


class Approval(NamedTuple):
    amount: int
    mcc: str
    at_ms: int


def local_day(at_ms: int) -> date:
    return datetime.fromtimestamp(at_ms / 1000, UTC).date()


def same_period(interval: str, a_ms: int, b_ms: int) -> bool:
    """Calendar arithmetic of specs/controls.md, here in UTC, written without engine code."""
    a, b = local_day(a_ms), local_day(b_ms)
    if interval == "daily":
        return a == b
    if interval == "weekly":
        return a - timedelta(days=a.weekday()) == b - timedelta(days=b.weekday())
    if interval == "monthly":
        return (a.year, a.month) == (b.year, b.month)
    if interval == "yearly":
        return a.year == b.year
    return True  # all_time


def counts_for(approval: Approval, categories: Sequence[str]) -> bool:
    return not categories or category(approval.mcc) in categories


def expand(names: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for name in names:
        found |= set(CATALOG.country_groups.get(name, {name}))
    return found


class Request(NamedTuple):
    mcc: str
    country: str | None
    channels: tuple[str, ...]
    amount: int


def oracle(
    controls: Controls, history: Sequence[Approval], request: Request, now_ms: int
) -> dict[str, str | None]:
    """What one level alone answers for each kind of check (None: passes)."""
    mcc_category = category(request.mcc)
    answer: dict[str, str | None] = dict.fromkeys(("channel", "mcc", "country", "amount", "count"))
    blocked_channels = [c for c in CHANNELS if not getattr(controls.channels, c)]
    for channel in request.channels:
        if channel in blocked_channels:
            answer["channel"] = f"channel_blocked:{channel}"
            break
    if request.mcc in controls.blocked_mccs:
        answer["mcc"] = "mcc_blocked"
    elif mcc_category in controls.blocked_categories:
        answer["mcc"] = f"mcc_category_blocked:{mcc_category}"
    elif (controls.allowed_mccs or controls.allowed_categories) and (
        request.mcc not in controls.allowed_mccs and mcc_category not in controls.allowed_categories
    ):
        answer["mcc"] = "mcc_not_allowed"
    country = request.country
    if country is not None and country in expand(controls.blocked_countries):
        answer["country"] = f"country_blocked:{country}"
    elif controls.allowed_countries and country is None:
        answer["country"] = "country_unknown"
    elif controls.allowed_countries and country not in expand(controls.allowed_countries):
        answer["country"] = f"country_not_allowed:{country}"
    for limit in controls.amount_limits:
        if limit.currency != "EUR" or (limit.categories and mcc_category not in limit.categories):
            continue
        spent = 0
        if limit.interval != "per_authorization":
            spent = sum(
                a.amount
                for a in history
                if same_period(limit.interval, a.at_ms, now_ms) and counts_for(a, limit.categories)
            )
        if spent + request.amount > limit.amount:
            suffix = ":" + "+".join(limit.categories) if limit.categories else ""
            answer["amount"] = f"{limit.interval}_amount_limit{suffix}"
            break
    for count_limit in controls.count_limits:
        if count_limit.categories and mcc_category not in count_limit.categories:
            continue
        relevant = [a for a in history if counts_for(a, count_limit.categories)]
        if count_limit.interval is not None:
            approvals = sum(
                1 for a in relevant if same_period(count_limit.interval, a.at_ms, now_ms)
            )
            name = f"{count_limit.interval}_count_limit"
        else:
            assert count_limit.window_seconds is not None
            since = now_ms - count_limit.window_seconds * 1000
            approvals = sum(1 for a in relevant if a.at_ms > since)
            name = "trailing_count_limit"
        if approvals >= count_limit.count:
            suffix = ":" + "+".join(count_limit.categories) if count_limit.categories else ""
            answer["count"] = name + suffix
            break
    return answer


def usage_from(history: Sequence[Approval]) -> Usage:
    usage = Usage()
    for approval in sorted(history, key=lambda a: a.at_ms):
        record_usage(usage, approval.amount, category(approval.mcc), periods_at(approval.at_ms))
    return usage


REQUEST = st.builds(
    Request,
    mcc=st.sampled_from(MCCS),
    country=st.one_of(st.none(), st.sampled_from(COUNTRIES)),
    channels=st.one_of(
        st.sampled_from((("chip",), ("contactless",), ("ecommerce",), ("atm_cash", "chip"), ())),
        st.lists(st.sampled_from(CHANNELS), max_size=2, unique=True).map(tuple),
    ),
    amount=st.integers(1, 20_000),
)


@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    programme=CONTROLS,
    account=CONTROLS,
    card=CONTROLS,
    card_history=HISTORY,
    account_history=HISTORY,
    request=REQUEST,
)
def test_the_strictest_level_wins(
    programme: Controls,
    account: Controls,
    card: Controls,
    card_history: list[tuple[int, str, int]],
    account_history: list[tuple[int, str, int]],
    request: Request,
) -> None:
    card_approvals = [Approval(amount, mcc, NOW_MS - ago) for amount, mcc, ago in card_history]
    account_approvals = [
        Approval(amount, mcc, NOW_MS - ago) for amount, mcc, ago in account_history
    ]
    card_usage, account_usage = usage_from(card_approvals), usage_from(account_approvals)
    # Programme and card limits count the card's usage, account limits the account's.
    levels = [(programme, card_usage), (account, account_usage), (card, card_usage)]
    histories = [card_approvals, account_approvals, card_approvals]
    alone = [
        oracle(controls, history, request, NOW_MS)
        for (controls, _), history in zip(levels, histories, strict=True)
    ]
    expected = next(
        (
            level[kind]
            for kind in ("channel", "mcc", "country", "amount", "count")
            for level in alone
            if level[kind] is not None
        ),
        None,
    )

    def check(chosen: Sequence[tuple[Controls, Usage]]) -> str | None:
        found = check_controls(
            chosen,
            mcc=request.mcc,
            country=request.country,
            channels=request.channels,
            amount=request.amount,
            currency="EUR",
            periods=periods_at(NOW_MS),
            catalog=CATALOG,
        )
        return None if found is None else found.reason

    combined = check(levels)
    event(f"refused by {combined.split(':')[0] if combined else 'nobody'}")
    assert combined == expected
    # Each level alone answers as the oracle says, and together they refuse iff one alone does.
    singles = [check([level]) for level in levels]
    for single, answers in zip(singles, alone, strict=True):
        kinds = ("channel", "mcc", "country", "amount", "count")
        assert single == next((answers[k] for k in kinds if answers[k] is not None), None)
    assert (combined is None) == all(single is None for single in singles)


# --- 5: through the Authorizer -------------------------------------------------------------------

HASHER = PanHasher(b"test-key")
CODEC = Codec(load_spec())
BERLIN = ZoneInfo("Europe/Berlin")
PAN = "5200001111222233"
CARD_ID = card_id_for(HASHER.card_key(PAN))
ACCOUNT_ID = "acct-controls"
DAILY_LIMIT = 10_000
TRAILING_COUNT = 3
TRAILING_WINDOW_S = 600
START = datetime(2026, 3, 28, 20, 0, tzinfo=UTC)  # the evening before Berlin's spring forward


def load_file(level: str) -> bytes:
    limits = (
        f'amount_limits = [{{ interval = "daily", amount = {DAILY_LIMIT}, currency = "EUR" }}]\n'
        f"count_limits = [{{ count = {TRAILING_COUNT}, window_seconds = {TRAILING_WINDOW_S} }}]\n"
    )
    text = f'[[accounts]]\nid = "{ACCOUNT_ID}"\ncurrency = "EUR"\nbalance = 100000000\n'
    if level == "account":
        text += "[accounts.controls]\n" + limits
    text += f'[[cards]]\npan = "{PAN}"\naccount = "{ACCOUNT_ID}"\nexpiry = "3012"\n'
    if level == "card":
        text += "[cards.controls]\n" + limits
    if level == "programme":
        text = "[programme_controls]\n" + limits + text
    return text.encode()


@dataclass
class Approved:
    fields: dict[str, str]
    at: datetime
    remaining: int  # what it still holds and counts
    reversed: bool = False  # fully


CLOCK_STEP = st.one_of(
    st.sampled_from((0, 1, 60, TRAILING_WINDOW_S - 1, TRAILING_WINDOW_S, TRAILING_WINDOW_S + 1)),
    st.integers(0, 3 * 3_600),
    st.just("midnight"),  # onto the next local midnight, or one second either side
    st.just("midnight-1"),
    st.just("midnight+1"),
)


class ControlsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="controls-properties-")
        self.ledger = Ledger(self.directory, durability="process", map_size_bytes=32 << 20)
        self.authorizer = Authorizer(
            self.ledger,
            HASHER,
            ProgrammeRules(catalog=CATALOG),
            hold_lifetime_seconds=30 * 86_400,
            zone=BERLIN,
        )
        self.now = START
        self.serial = 0
        self.approved: list[Approved] = []
        self.level = ""

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @initialize(level=st.sampled_from(("card", "account", "programme")))
    def load(self, level: str) -> None:
        self.level = level
        apply_load_file(self.ledger, parse_load_file(load_file(level), "model"), HASHER, "model")

    # --- the model ----------------------------------------------------------------------------

    def today(self, at: datetime) -> date:
        return at.astimezone(BERLIN).date()

    def used_today(self) -> int:
        today = self.today(self.now)
        return sum(a.remaining for a in self.approved if self.today(a.at) == today)

    def in_window(self) -> int:
        since = self.now - timedelta(seconds=TRAILING_WINDOW_S)
        return sum(1 for a in self.approved if not a.reversed and a.at > since)

    # --- messages -----------------------------------------------------------------------------

    def fields(self, mti: str, amount: int, **extra: str) -> dict[str, str]:
        self.serial += 1
        moment = (START + timedelta(seconds=self.serial)).strftime("%m%d%H%M%S")
        fields = {
            "t": mti,
            "2": PAN,
            "3": "000000",
            "4": f"{amount:012d}",
            "7": moment,
            "11": f"{self.serial:06d}",
            "18": "5411",
            "22": "051",
            "32": "123456",
            "37": f"{self.serial:012d}",
            "41": "TERM0001",
            "42": "MERCHANT0000001",
            "49": "978",
        }
        fields.update(extra)
        return fields

    def send(self, fields: list[dict[str, str]]) -> list[tuple[str, str]]:
        requests = []
        for one in fields:
            request = CODEC.decode(CODEC.encode(one))
            assert isinstance(request, AuthorizationRequest)
            requests.append(request)
        outcomes = self.authorizer.authorize_batch(requests, self.now)
        for outcome in outcomes:
            response = outcome.fields
            assert response["39"] == outcome.response_code
        return [(o.response_code, o.reason) for o in outcomes]

    def reversal(self, original: Approved, target: int | None) -> dict[str, str]:
        sent = original.fields
        data = f"0100{sent['11']}{sent['7']}{int(sent['32']):011d}{0:011d}"
        extra = {"90": data}
        if target is not None:
            extra["95"] = f"{target:012d}" + "0" * 30
        return self.fields("0400", int(sent["4"]), **extra)

    # --- rules --------------------------------------------------------------------------------

    @rule(
        amounts=st.lists(
            st.one_of(st.integers(1, 3_000), st.integers(3_000, DAILY_LIMIT + 1)),
            min_size=1,
            max_size=4,
        )
    )
    def authorize(self, amounts: list[int]) -> None:
        batch = [self.fields("0100", amount) for amount in amounts]
        answers = self.send(batch)
        for fields, amount, answer in zip(batch, amounts, answers, strict=True):
            if self.used_today() + amount > DAILY_LIMIT:
                expected = ("61", "daily_amount_limit")
            elif self.in_window() + 1 > TRAILING_COUNT:
                expected = ("65", "trailing_count_limit")
            else:
                expected = ("00", "approved")
                self.approved.append(Approved(fields, self.now, amount))
            event(f"{self.level}: {expected[1]}")
            assert answer == expected

    @precondition(lambda self: any(not a.reversed for a in self.approved))
    @rule(which=st.integers(0, 10**6), share=st.one_of(st.none(), st.integers(0, 120)))
    def reverse(self, which: int, share: int | None) -> None:
        """Full (no field 95, or 95 = 0) or partial (95 = share % of the original amount)."""
        standing = [a for a in self.approved if not a.reversed]
        original = standing[which % len(standing)]
        target = None if share is None else int(original.fields["4"]) * share // 100
        [answer] = self.send([self.reversal(original, target)])
        if not target:
            expected = ("00", "reversed")
            original.reversed = True
            original.remaining = 0
        elif target < original.remaining:
            expected = ("00", "partially_reversed")
            original.remaining = target
        else:
            expected = ("00", "reversal_no_change")
        event(f"reversal: {expected[1]}")
        assert answer == expected

    @rule(step=CLOCK_STEP)
    def clock(self, step: int | str) -> None:
        if isinstance(step, int):
            self.now += timedelta(seconds=step)
            return
        local = self.now.astimezone(BERLIN)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), BERLIN)
        offset = {"midnight": 0, "midnight-1": -1, "midnight+1": 1}[step]
        self.now = midnight.astimezone(UTC) + timedelta(seconds=offset)

    @rule()
    def reverse_everything(self) -> None:
        standing = [a for a in self.approved if not a.reversed]
        if standing:
            answers = self.send([self.reversal(a, None) for a in standing])
            assert answers == [("00", "reversed")] * len(standing)
            for approval in standing:
                approval.reversed = True
                approval.remaining = 0
        now = periods_at(int(self.now.timestamp() * 1000), BERLIN)
        with self.ledger.read() as reader:
            for scope in ("c:" + CARD_ID, "a:" + ACCOUNT_ID):
                usage = reader.usage(scope)
                for interval in CALENDAR_INTERVALS:
                    assert used(usage, interval, now) == (0, 0), (scope, interval)
                assert trailing_count(usage, now, 86_400, ()) == 0

    # --- after every step ---------------------------------------------------------------------

    @invariant()
    def usage_agrees_with_the_model(self) -> None:
        if not self.level:
            return
        assert 0 <= self.used_today() <= DAILY_LIMIT
        now = periods_at(int(self.now.timestamp() * 1000), BERLIN)
        standing = [a for a in self.approved if not a.reversed]
        with self.ledger.read() as reader:
            for scope in ("c:" + CARD_ID, "a:" + ACCOUNT_ID):
                usage = reader.usage(scope)
                assert used(usage, "daily", now)[0] == self.used_today()
                assert used(usage, "all_time", now) == (
                    sum(a.remaining for a in standing),
                    len(standing),
                )
                assert trailing_count(usage, now, TRAILING_WINDOW_S, ()) == self.in_window()
            account = reader.account(ACCOUNT_ID)
            assert account is not None and account.held == sum(a.remaining for a in standing)


ControlsMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestControlsThroughTheAuthorizer = ControlsMachine.TestCase
