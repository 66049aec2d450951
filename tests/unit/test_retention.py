"""Retention (issue 12): records past their horizon are pruned in bounded steps, and nothing a
hold, an undelivered event or the API's idempotency promise still needs."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import DEMO_LOAD_EVENTS, authorization

from processor.authorizer import Authorizer
from processor.config import RetentionConfig
from processor.engine import ProgrammeRules
from processor.ledger import store
from processor.ledger.load import load_path
from processor.ledger.records import AnswerTime, ClearedRecord, IdempotentResponse, StoredAnswer
from processor.ledger.retention import Retention, SweepStep
from processor.ledger.store import Ledger
from processor.ledger.verify import verify
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest, rrn_key

HASHER = PanHasher(b"retention-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MAIN = "4761739001010085"  # demo-main
LOW = "4761739001010069"  # demo-low
HOUR = 3600
# Short horizons, as a test or a soak sets them: answers 2 h, events 1 h, holds live 1 h.
HORIZONS = RetentionConfig(answers_seconds=2 * HOUR, events_seconds=HOUR, clearing_seconds=2 * HOUR)
BIG = 10_000  # a budget larger than anything here


def message(
    mti: str, stan: str, amount: int, pan: str = MAIN, **extra: str
) -> AuthorizationRequest:
    """A message on the demo ledger's cards (support.authorization), with an RRN."""
    return authorization(pan, stan, amount, t=mti, **{"37": f"63301200{stan[-4:]}", **extra})


ORIGINAL_1 = f"0100000001112412000000000123456{0:011d}"
REQUESTS = [
    message("0100", "000001", 1000),  # a hold, reversed below
    message("0100", "000002", 700),  # a hold left open
    message("0100", "000003", 10_000, pan=LOW),  # declined
    message("0200", "000004", 500),  # posted at once
    message("0400", "000005", 1000, **{"90": ORIGINAL_1}),
    message("0120", "000006", 300, **{"39": "00"}),  # a stand-in advice: a hold, open
]


def retention(floor: int | None = None, config: RetentionConfig = HORIZONS) -> Retention:
    return Retention(config, rrn_key, lambda: floor)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    load_path(ledger, demo_data_path(), HASHER, now_ms=int(NOW.timestamp() * 1000))
    with ledger.read() as reader:
        assert reader.outbox_last_sequence() == DEMO_LOAD_EVENTS
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    outcomes = authorizer.authorize_batch(REQUESTS, NOW)
    assert [o.response_code for o in outcomes] == ["00", "00", "51", "00", "00", "00"]
    yield ledger
    ledger.close()


def step(ledger: Ledger, sweep: Retention, at: datetime, budget: int = BIG) -> SweepStep:
    now_ms = int(at.timestamp() * 1000)
    with ledger.write() as writer:
        return sweep.step(writer, now_ms, budget)


def kept_answers(ledger: Ledger) -> set[str]:
    with ledger.read() as reader:
        return {request.stan for request in REQUESTS if reader.answer(request.answer_key)}


def test_nothing_is_pruned_before_its_horizon(ledger: Ledger) -> None:
    done = step(ledger, retention(), NOW + timedelta(minutes=59))
    assert done.pruned == {} and done.visited["answers"] == 6
    assert kept_answers(ledger) == {f"{n:06d}" for n in range(1, 7)}


def test_past_the_horizons_answers_and_events_go_but_not_open_holds(ledger: Ledger) -> None:
    with ledger.read() as reader:
        rrns = {request.stan: reader.answer_by_rrn(request.rrn_key or b"") for request in REQUESTS}
    assert all(rrns[stan] is not None for stan in ("000001", "000002", "000003", "000006"))
    done = step(ledger, retention(), NOW + timedelta(hours=2, seconds=1))
    assert done.pruned == {"events": DEMO_LOAD_EVENTS + 6, "answers": 4}
    assert done.kept == {("answers", "open_hold"): 2}
    # The open holds' answers stay, so their reversals and completions still find them.
    assert kept_answers(ledger) == {"000002", "000006"}
    with ledger.read() as reader:
        assert reader.outbox(1, 100) == []
        assert reader.answer_by_rrn(REQUESTS[0].rrn_key or b"") is None  # pruned with it
        assert reader.answer_by_rrn(REQUESTS[1].rrn_key or b"") is not None
        assert [hold.hold_id for hold in reader.all_holds()] == [2, 3]
        assert reader.pruned_hold_max() == 1  # the reversal's answer named hold 1
        # Balances are the state and stay; the ledger still verifies.
        account = reader.account("demo-main")
        assert account is not None and account.open_holds == 2 and account.held == 1_000
        assert verify(reader).problems == []


def test_answers_go_once_their_holds_expire(ledger: Ledger) -> None:
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    later = NOW + timedelta(hours=2, seconds=1)
    step(ledger, retention(), later)
    assert authorizer.sweep_expired(later, 100) == 2
    done = step(ledger, retention(), later + timedelta(seconds=1))
    # The expiry events are young and refer to no answer's facts: the answers go.
    assert done.pruned == {"answers": 2} and kept_answers(ledger) == set()
    with ledger.read() as reader:
        assert [record.type for record in reader.outbox(1, 100)] == ["authorization.expired"] * 2
        assert verify(reader).problems == []


def test_undelivered_events_and_the_answers_they_refer_to_are_kept(ledger: Ledger) -> None:
    first_kept = DEMO_LOAD_EVENTS + 3  # the requests' first two events were delivered
    done = step(ledger, retention(floor=first_kept), NOW + timedelta(hours=3))
    assert done.pruned == {"events": DEMO_LOAD_EVENTS + 2}
    assert done.kept == {
        ("events", "undelivered"): 1,
        ("answers", "event_kept"): 4,
        ("answers", "open_hold"): 2,
    }
    with ledger.read() as reader:
        sequences = [record.sequence for record in reader.outbox(1, 100)]
        assert sequences == list(range(first_kept, first_kept + 4))
    assert len(kept_answers(ledger)) == 6
    # Delivered at last: the rest goes.
    done = step(ledger, retention(floor=first_kept + 4), NOW + timedelta(hours=3))
    assert done.pruned == {"events": 4, "answers": 4}


def test_a_retransmission_after_its_answer_is_pruned_is_decided_afresh(ledger: Ledger) -> None:
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    later = NOW + timedelta(hours=3)
    step(ledger, retention(), later)
    [again] = authorizer.authorize_batch([REQUESTS[2]], later)  # the declined one
    assert (again.response_code, again.reason) == ("51", "insufficient_funds")


def test_clearing_and_idempotency_records_go_after_their_own_horizons(ledger: Ledger) -> None:
    encode = msgspec.msgpack.encode
    made = int(NOW.timestamp() * 1000)
    with ledger.write() as writer:
        for record_id in ("clr-1", "clr-2"):
            writer.put_clearing_record(
                record_id,
                ClearedRecord(
                    outcome="force_posted",
                    fingerprint=b"f",
                    processed_ms=made if record_id == "clr-1" else made + 3 * HOUR * 1000,
                    card_id="c",
                    account_id="demo-main",
                    amount=1,
                    currency="EUR",
                ),
            )
        writer.put_idempotent(
            b"scope-1",
            encode(IdempotentResponse(body_digest=b"d", status=201, body=b"{}", created_ms=made)),
        )
    done = step(ledger, retention(), NOW + timedelta(hours=2, seconds=1))
    assert done.pruned["clearing"] == 1 and "idempotency" not in done.pruned
    with ledger.read() as reader:
        assert reader.clearing_record("clr-1") is None
        assert reader.clearing_record("clr-2") is not None
        assert reader.idempotent(b"scope-1") is not None  # honoured at least 24 hours
    done = step(ledger, retention(), NOW + timedelta(days=2, seconds=1))
    assert done.pruned["idempotency"] == 1
    with ledger.read() as reader:
        assert reader.idempotent(b"scope-1") is None


def test_the_clock_hand_visits_a_bounded_number_per_step_and_goes_round(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    load_path(ledger, demo_data_path(), HASHER)
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    for batch in range(10):
        requests = [
            message("0100", f"{batch * 20 + n + 1:06d}", 1, **{"7": f"11241{batch}0000"})
            for n in range(20)
        ]
        outcomes = authorizer.authorize_batch(requests, NOW + timedelta(seconds=batch))
        assert {o.response_code for o in outcomes} == {"00"}
    later = NOW + timedelta(hours=3)
    assert authorizer.sweep_expired(later, 1000) == 200
    sweep = retention()
    steps = 0
    while True:
        done = step(ledger, sweep, later, budget=16)
        steps += 1
        assert all(count <= 16 for count in done.visited.values()), done.visited
        if done.wrapped and not done.busy:
            break
        assert steps < 100
    with ledger.read() as reader:
        assert list(reader.all_answers()) == []
        assert verify(reader).problems == []
    ledger.close()


def test_batches_carry_the_sweep_and_report_what_it_did(ledger: Ledger) -> None:
    authorizer = Authorizer(
        ledger,
        HASHER,
        ProgrammeRules(),
        hold_lifetime_seconds=HOUR,
        retention=retention(),
        expire_in_batches=True,
        retention_every_seconds=0.0,  # a step in every batch, however close together
    )
    assert authorizer.take_retention_step() is None
    later = NOW + timedelta(hours=3)
    # A batch of one: the sweep's budget is small (limits.retention_visits_min per database).
    [outcome] = authorizer.authorize_batch(
        [message("0100", "000099", 10, **{"7": "1124150000"})], later
    )
    assert outcome.response_code == "00"
    # Both open holds were due: released in the batch (2 per change, at least), with events.
    assert authorizer.take_expired() == 2 and authorizer.take_expired() == 0
    done = authorizer.take_retention_step()
    assert done is not None and done.pruned == {"events": 4}
    assert done.visited["answers"] == 4  # the batch's own share, not a backlog's
    assert authorizer.take_retention_step() is None  # counted once
    # Batches of three: three visits per change. The old events (the demo load's among them)
    # go first; then nothing refers to the old answers, and they go too when the clock hand
    # comes round to them (in the eleventh batch).
    pruned: dict[str, int] = {}
    for batch in range(11):
        requests = [
            message("0100", f"001{batch:02d}{n}", 10, **{"7": "1124150000"}) for n in range(3)
        ]
        assert {o.response_code for o in authorizer.authorize_batch(requests, later)} == {"00"}
        done = authorizer.take_retention_step()
        assert done is not None and max(done.visited.values()) <= 9
        for record, count in done.pruned.items():
            pruned[record] = pruned.get(record, 0) + count
    assert pruned == {"events": DEMO_LOAD_EVENTS + 6 - 4, "answers": 6}
    assert kept_answers(ledger) == set()


def test_a_disabled_retention_prunes_nothing(ledger: Ledger) -> None:
    done = step(ledger, retention(config=RetentionConfig(enabled=False)), NOW + timedelta(days=400))
    assert done == SweepStep()
    assert len(kept_answers(ledger)) == 6


def test_an_old_answer_this_batch_writes_again_is_not_pruned_under_it(ledger: Ledger) -> None:
    """A reversal of a 0200 past the horizon credits it and writes its answer again at
    commit: deleting the stored copy in the same transaction would be undone at flush and
    lose its RRN index entry."""
    posted = REQUESTS[3]  # the 0200, posted at once
    later = int((NOW + timedelta(hours=3)).timestamp() * 1000)
    with ledger.write() as writer:
        answer = writer.answer(posted.answer_key)
        assert answer is not None
        answer.reversed_amount = 500  # as a reversal's credit does, in this transaction
        writer.put_answer(posted.answer_key, answer)
        done = retention().step(writer, later, BIG)
    assert done.kept.get(("answers", "written_now")) == 1
    assert done.pruned["answers"] == 3  # the others past the horizon without an open hold
    with ledger.read() as reader:
        kept = reader.answer(posted.answer_key)
        assert kept is not None and kept.reversed_amount == 500
        assert reader.answer_by_rrn(posted.rrn_key or b"") == posted.answer_key


def test_the_budget_counts_events_every_process_makes(ledger: Ledger) -> None:
    """Worker processes write the same ledger without sweeping it: the primary's steps are
    sized by the events made, not by its own batches."""
    sweep = retention()
    with ledger.write() as writer:
        assert sweep.budget(writer, 4) == 4  # nothing seen yet
    other = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    requests = [message("0100", f"0002{n:02d}", 1, **{"7": "1124130000"}) for n in range(40)]
    other.authorize_batch(requests, NOW)  # another process's batch: 40 events
    with ledger.write() as writer:
        assert sweep.budget(writer, 4) == 80  # two visits per event
        assert sweep.budget(writer, 4) == 4  # spent


def test_an_unreadable_delivery_state_keeps_every_event(tmp_path: Path) -> None:
    from processor.config import Config, LedgerConfig, WebhookEndpoint, WebhooksConfig
    from processor.webhooks.state import DeliveryFloor

    config = Config(
        ledger=LedgerConfig(path=str(tmp_path / "ledger")),
        webhooks=WebhooksConfig(
            endpoints=(WebhookEndpoint(name="a", url="http://127.0.0.1:9/", secret_envs=("S",)),)
        ),
    )
    state = tmp_path / "ledger" / "webhooks"
    state.mkdir(parents=True)
    (state / "data.mdb").write_bytes(b"not an LMDB file" * 512)
    floor = DeliveryFloor(config)
    assert floor() == 1  # as if nothing were delivered: no event is pruned
    assert DeliveryFloor(Config(ledger=LedgerConfig(path=str(tmp_path / "x"))))() is None


def test_dead_letters_grow_the_delivery_state_and_the_floor_reads_on(tmp_path: Path) -> None:
    """The state's map was a fixed 64 MiB: some 815,000 dead letters filled it, and then the
    endpoint could bury nothing more and never moved on. It grows; the daemon's floor reader
    (another process) adopts the new size instead of reading "unreadable" (and so keeping
    every event for good)."""
    import subprocess
    import sys

    from processor.config import Config, LedgerConfig, WebhookEndpoint, WebhooksConfig
    from processor.webhooks.state import DeliveryFloor

    config = Config(
        ledger=LedgerConfig(path=str(tmp_path / "ledger")),
        webhooks=WebhooksConfig(
            endpoints=(WebhookEndpoint(name="a", url="http://127.0.0.1:9/", secret_envs=("S",)),)
        ),
    )
    where = tmp_path / "ledger" / "webhooks"
    writer = (
        "import sys\n"
        "from processor.webhooks.state import DeadLetter, DeliveryState\n"
        "state = DeliveryState(sys.argv[1], map_size=1 << 20)\n"
        "state.advance('a', 50_000)\n"
        "for sequence in range(int(sys.argv[2]), int(sys.argv[3])):\n"
        "    state.bury('a', DeadLetter(sequence=sequence, event_id='e', attempts=1,\n"
        "                               last_error='x', dead_ms=1))\n"
        "print(state.env.info()['map_size'])\n"
        "state.close()\n"
    )

    def delivery_process(first: int, end: int) -> int:
        done = subprocess.run(
            [sys.executable, "-c", writer, str(where), str(first), str(end)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return int(done.stdout)

    assert delivery_process(40_000, 40_001) == 1 << 20
    ticks = iter(range(0, 10_000, 10))
    floor = DeliveryFloor(config, clock=lambda: float(next(ticks)))
    try:
        assert floor() == 40_000
        assert delivery_process(20_000, 40_000) > 1 << 20  # grown, not full
        assert floor() == 20_000  # the oldest dead letter, read through the grown map
    finally:
        floor.close()


@given(
    st.builds(
        StoredAnswer,
        fingerprint=st.binary(max_size=40),
        response=st.dictionaries(st.sampled_from(["4", "37", "38", "39", "43"]), st.text()),
        response_code=st.text(max_size=2),
        reason=st.text(max_size=40),
        answered_ms=st.integers(0, 2**62),
        card_id=st.none() | st.text(max_size=20),
        hold_id=st.none() | st.integers(0, 2**40),
        previous_for_card=st.none() | st.binary(max_size=40),
    )
)
def test_an_answers_time_reads_as_the_whole_answer_gives_it(answer: StoredAnswer) -> None:
    # What the clock hand decodes of a young answer (AnswerTime) must be StoredAnswer's own
    # answered_ms: the two types' first fields agree.
    raw = msgspec.msgpack.encode(answer)
    assert msgspec.msgpack.decode(raw, type=AnswerTime).answered_ms == answer.answered_ms


# --- an answer key used again after its answer was pruned ---------------------------------------
# The key is class|acquirer|STAN|field 7, and field 7 has no year: a year on, the acquirer's
# STAN can come round at the same second, and the histories still naming the key must not
# follow it into what it holds now.


def test_a_key_used_again_by_another_card_stays_out_of_the_first_cards_history(
    ledger: Ledger,
) -> None:
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    [first] = authorizer.authorize_batch(
        [message("0200", "777777", 50)], NOW + timedelta(minutes=1)
    )
    assert first.response_code == "00"
    later = NOW + timedelta(hours=3)
    authorizer.sweep_expired(later, 100)
    step(ledger, retention(), later)
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None
        main_card, main_account = card.card_id, card.account_id
        assert reader.card_history(main_card, 20) == []
    [again] = authorizer.authorize_batch(
        [message("0200", "777777", 5, pan=LOW)], NOW + timedelta(days=365)
    )
    assert again.response_code == "00"
    with ledger.read() as reader:
        assert reader.card_history(main_card, 20) == []
        assert [a.account_id for _, a, _ in reader.history("account", main_account, 20)] == []


def test_a_key_used_again_by_the_same_card_is_listed_once(ledger: Ledger) -> None:
    """Its answer linked to itself: the chain was a loop, every page the same key and a next
    cursor for ever."""
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    authorizer.authorize_batch([message("0200", "777777", 50)], NOW + timedelta(minutes=1))
    later = NOW + timedelta(hours=3)
    authorizer.sweep_expired(later, 100)
    step(ledger, retention(), later)
    authorizer.authorize_batch([message("0200", "777777", 5)], NOW + timedelta(days=365))
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None
        page = reader.history("card", card.card_id, 5)
        assert len(page) == 1
        assert reader.history("card", card.card_id, 5, before=page[-1][2]) == []
        accounts = reader.history("account", card.account_id, 5)
        assert len(accounts) == 1


def test_a_step_that_fails_in_a_batch_leaves_nothing_half_done(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the step after some of its writes: the batch committed them (events pruned,
    an answer's RRN entry deleted with the answer kept). The batch now runs again without
    the step, and nothing of the step stays."""
    sweep = retention()
    sweep._events_seen = 0  # as after a while of traffic: a budget of visits per event made
    authorizer = Authorizer(
        ledger,
        HASHER,
        ProgrammeRules(),
        hold_lifetime_seconds=HOUR,
        retention=sweep,
        retention_every_seconds=0.0,
    )
    real = SweepStep.count

    def buggy(self: SweepStep, into: dict[str, int], record: str) -> None:
        if into is self.pruned and record == "answers":
            raise RuntimeError("a bug in the step")
        real(self, into, record)

    monkeypatch.setattr(SweepStep, "count", buggy)

    def rrn_index() -> dict[str, bytes | None]:
        with ledger.read() as reader:
            return {r.stan: reader.answer_by_rrn(r.rrn_key) for r in REQUESTS if r.rrn_key}

    indexed = rrn_index()
    with ledger.read() as reader:
        events_before = len(reader.outbox(1, 100))
    later = NOW + timedelta(hours=3)
    [outcome] = authorizer.authorize_batch(
        [message("0100", "000099", 10, **{"7": "1124150000"})], later
    )
    assert outcome.response_code == "00"
    assert authorizer.take_retention_step() is None
    with ledger.read() as reader:
        assert reader.events_pruned_through() == 0
        assert len(reader.outbox(1, 100)) == events_before + 1  # the batch's own event
        assert all(reader.answer(request.answer_key) is not None for request in REQUESTS)
    assert rrn_index() == indexed  # no entry deleted beside its kept answer


def test_an_event_kept_behind_the_first_but_stamped_earlier_keeps_its_answer(
    ledger: Ledger,
) -> None:
    """Answers were kept from the first kept event's time only: an event committed after it
    but stamped a second earlier (a worker reads its clock before the writer lock) lost its
    answer, and rendered without card, amount, response code or network ids."""
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    first = message("0200", "000100", 10, **{"7": "1124120002"})
    behind = message("0200", "000101", 10, **{"7": "1124120001"})
    assert authorizer.authorize_batch([first], NOW + timedelta(seconds=2))[0].response_code == "00"
    assert authorizer.authorize_batch([behind], NOW + timedelta(seconds=1))[0].response_code == "00"
    with ledger.read() as reader:
        last = reader.outbox_last_sequence()
    step(ledger, retention(floor=last - 1), NOW + timedelta(hours=3))  # neither delivered
    with ledger.read() as reader:
        assert [e.sequence for e in reader.outbox(last - 1, 10)] == [last - 1, last]
        assert reader.answer(behind.answer_key) is not None
        [event] = reader.outbox(last, 1)
        assert event.mti == "0200" and event.response_code == "00"


def test_the_oldest_answer_is_found_across_new_year(tmp_path: Path) -> None:
    """Answers sort by field 7 without a year: the first in key order (this January's) was
    reported as the oldest, last December's sorting after it."""
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    try:
        load_path(ledger, demo_data_path(), HASHER, now_ms=int(NOW.timestamp() * 1000))
        authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
        december = datetime(2026, 12, 31, 23, 0, tzinfo=UTC)
        january = datetime(2027, 1, 1, 1, 0, tzinfo=UTC)
        authorizer.authorize_batch([message("0200", "000001", 10, **{"7": "1231230000"})], december)
        authorizer.authorize_batch([message("0200", "000002", 10, **{"7": "0101010000"})], january)
        [answers] = [each for each in ledger.stats() if each.name == "answers"]
        assert answers.oldest_ms == int(december.timestamp() * 1000)
    finally:
        ledger.close()


def test_a_history_walk_goes_past_an_answer_stamped_a_little_earlier(ledger: Ledger) -> None:
    """A worker reads its clock before LMDB's writer lock: the next batch may be stamped a
    little earlier than the one before it. The walk stopped there for good."""
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    first = message("0100", "000101", 10, **{"7": "1124120002"})
    behind = message("0100", "000102", 10, **{"7": "1124120001"})
    authorizer.authorize_batch([first], NOW + timedelta(seconds=2))
    authorizer.authorize_batch([behind], NOW + timedelta(seconds=1))
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None
        listed = [key for key, _ in reader.card_history(card.card_id, 100)]
        assert listed[:2] == [behind.answer_key, first.answer_key]
        holds = reader.account_holds(card.account_id)
        assert {first.answer_key, behind.answer_key} <= {hold.identity for hold in holds}


def test_a_clock_stepped_back_keeps_histories_and_the_answers_of_kept_events(
    ledger: Ledger,
) -> None:
    """A system clock stepped back ten minutes (NTP, a VM restored) stamped the next answer
    older than the one before it on its card: every history walk and hold listing ended
    there for good; and its event, stamped older than the events before it, lost its answer
    to retention while it waited for delivery. The ledger's time waits for the clock."""
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3 * HOUR)
    first = message("0100", "000101", 10)
    behind = message("0200", "000102", 20)
    after = NOW + timedelta(minutes=5)
    assert authorizer.authorize_batch([first], after)[0].response_code == "00"
    stepped_back = after - timedelta(minutes=10)
    assert authorizer.authorize_batch([behind], stepped_back)[0].response_code == "00"
    with ledger.read() as reader:
        last = reader.outbox_last_sequence()
        answer = reader.answer(behind.answer_key)
        assert answer is not None and answer.answered_ms == int(after.timestamp() * 1000)
        card = reader.card(HASHER.card_key(MAIN))
        assert card is not None
        listed = [key for key, _ in reader.card_history(card.card_id, 100)]
        assert listed[:2] == [behind.answer_key, first.answer_key]
        listed = [key for key, _, _ in reader.history("account", card.account_id, 100)]
        assert listed[:2] == [behind.answer_key, first.answer_key]
        assert first.answer_key in {hold.identity for hold in reader.account_holds("demo-main")}
    # Neither event delivered yet; past the answers' horizon.
    step(ledger, retention(floor=last - 1), after + timedelta(hours=2, minutes=30))
    with ledger.read() as reader:
        assert reader.answer(behind.answer_key) is not None
        [event] = reader.outbox(last, 1)
        assert (event.mti, event.amount, event.response_code) == ("0200", 20, "00")


def test_a_ledger_clock_once_set_far_ahead_is_not_waited_for(
    ledger: Ledger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waited for whatever the distance, a clock once set a year ahead froze the ledger's
    time for that year: usage windows never rolled over, holds never expired, valid cards
    were expired. Beyond an hour behind, the wall clock is followed again, and it is said."""
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=HOUR)
    monkeypatch.setattr(store, "_clock_back_said_at", -float("inf"))  # said once an hour
    ahead = NOW + timedelta(days=365)
    authorizer.authorize_batch([message("0100", "000101", 10)], ahead)
    back = NOW + timedelta(minutes=1)
    with caplog.at_level("WARNING", logger="processor.ledger"):
        request = message("0100", "000102", 10)
        assert authorizer.authorize_batch([request], back)[0].response_code == "00"
    assert "the wall clock is 31535940 s behind the latest time the ledger used" in caplog.text
    back_ms = int(back.timestamp() * 1000)
    with ledger.read() as reader:
        answer = reader.answer(request.answer_key)
        assert answer is not None and answer.answered_ms == back_ms
        assert answer.hold is not None and answer.hold.expires_ms == back_ms + HOUR * 1000


def test_a_posting_marker_leaves_the_rrn_index_with_it(ledger: Ledger) -> None:
    """A force post with no original leaves a marker answer and an RRN entry naming it; the
    marker kept no RRN, so retention pruned it and left the entry behind."""
    from processor.clearing import apply_clearing, parse_lines

    record = {
        "record_id": "clr-1",
        "type": "purchase",
        "pan": MAIN,
        "acquirer": "123456",
        "stan": "000777",
        "transmission_datetime": "1124120000",
        "amount": 100,
        "currency": "EUR",
        "rrn": "633012000777",
    }
    summary = apply_clearing(ledger, parse_lines([msgspec.json.encode(record)]), HASHER, NOW)
    assert summary.force_posted == 1
    lookup = rrn_key("123456", "000777", "633012000777")
    with ledger.read() as reader:
        assert reader.answer_by_rrn(lookup) == b"0100|123456|000777|1124120000"
    step(ledger, retention(), NOW + timedelta(days=2))
    with ledger.read() as reader:
        assert reader.answer(b"0100|123456|000777|1124120000") is None
        assert reader.answer_by_rrn(lookup) is None
