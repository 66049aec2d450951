"""The transaction lifecycle over a real socket: financials, reversals, advices, completions."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import Link, RunningDaemon, authorization, decode, next_stan, sample, scrape

from processor.ledger.store import Ledger

pytestmark = pytest.mark.e2e

MAIN = "4761739001010010"  # demo-main, EUR, per-transaction limit 500000
LOAD = "4761739001010085"  # demo-main, no limit
LOW = "4761739001010069"  # demo-low, 50.00 EUR


def balances(daemon: RunningDaemon, account: str = "demo-main") -> tuple[int, int]:
    daemon.settle()
    ledger = Ledger(daemon.ledger, readonly=True)
    try:
        with ledger.read() as reader:
            found = reader.account(account)
            assert found is not None
            return found.posted, found.held
    finally:
        ledger.close()


def original_data(request: dict[str, str]) -> str:
    """Field 90 pointing at `request`: MTI, STAN, field 7, acquirer and forwarder (11 each)."""
    return f"{request['t']}{request['11']}{request['7']}{int(request['32']):011d}{0:011d}"


def follow_up(mti: str, original: dict[str, str], amount: int, **extra: str) -> dict[str, str]:
    message = authorization(pan=original["2"], amount=amount)
    message.update({"t": mti, "37": original.get("37", "000000000001")})
    message.update(extra)
    return message


def test_financial_0200_posts_at_once(daemon: RunningDaemon, link: Link) -> None:
    posted, held = balances(daemon)
    response = link.exchange(authorization(pan=LOAD, amount=1234, t="0200"))
    assert (response["t"], response["39"]) == ("0210", "00")
    assert "38" in response
    assert balances(daemon) == (posted - 1234, held)
    declined = link.exchange(authorization(pan=LOW, amount=999_999, t="0200"))
    assert (declined["t"], declined["39"]) == ("0210", "51")
    assert balances(daemon, "demo-low") == (5000, 0)


def test_full_reversal_through_field_90_voids_the_hold_once(
    daemon: RunningDaemon, link: Link
) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=5000)
    assert link.exchange(original)["39"] == "00"
    assert balances(daemon) == (posted, held + 5000)
    reversal = follow_up("0400", original, 5000, **{"90": original_data(original)})
    response = link.exchange(reversal)
    assert (response["t"], response["39"], response["90"]) == ("0410", "00", reversal["90"])
    assert balances(daemon) == (posted, held)
    # A second, distinct reversal of the same original changes nothing.
    again = follow_up("0400", original, 5000, **{"90": original_data(original)})
    assert link.exchange(again)["39"] == "00"
    assert balances(daemon) == (posted, held)
    # A repeat (0401) of the first reversal gets its answer byte for byte.
    link.send_fields(reversal)
    first = link.receive()
    link.send_fields(dict(reversal, t="0401"))
    assert link.receive() == first


def test_reversal_without_field_90_matches_on_acquirer_stan_rrn(
    daemon: RunningDaemon, link: Link
) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=700, **{"37": "123456789012"})
    assert link.exchange(original)["39"] == "00"
    reversal = dict(original, t="0400", **{"7": "1124111111"})  # same 32, 11, 37
    assert link.exchange(reversal)["39"] == "00"
    assert balances(daemon) == (posted, held)


def test_partial_reversal_shrinks_the_hold(daemon: RunningDaemon, link: Link) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=10_000)
    assert link.exchange(original)["39"] == "00"
    reversal = follow_up(
        "0400", original, 10_000, **{"90": original_data(original), "95": f"{6000:012d}" + "0" * 30}
    )
    assert link.exchange(reversal)["39"] == "00"
    assert balances(daemon) == (posted, held + 6000)


def test_reversal_of_a_financial_credits_it_back(daemon: RunningDaemon, link: Link) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=2500, t="0200")
    assert link.exchange(original)["39"] == "00"
    partial = follow_up(
        "0400", original, 2500, **{"90": original_data(original), "95": f"{1000:012d}" + "0" * 30}
    )
    assert link.exchange(partial)["39"] == "00"
    assert balances(daemon) == (posted - 1000, held)
    full = follow_up("0420", original, 2500, **{"90": original_data(original)})
    assert link.exchange(full)["39"] == "00"
    assert balances(daemon) == (posted, held)


def test_unknown_and_declined_originals(daemon: RunningDaemon, link: Link) -> None:
    posted, held = balances(daemon)
    ghost = authorization(pan=LOAD, amount=100)  # never sent
    orphan = follow_up("0400", ghost, 100, **{"90": original_data(ghost)})
    assert link.exchange(orphan)["39"] == "25"
    orphan_advice = follow_up("0420", ghost, 100, **{"90": original_data(ghost)})
    response = link.exchange(orphan_advice)
    assert (response["t"], response["39"]) == ("0430", "00")
    declined = authorization(pan=MAIN, amount=100, **{"18": "7995"})  # blocked MCC: 57
    assert link.exchange(declined)["39"] == "57"
    reversal = follow_up("0400", declined, 100, **{"90": original_data(declined)})
    assert link.exchange(reversal)["39"] == "00"
    assert balances(daemon) == (posted, held)


def test_stand_in_advice_is_recorded_even_when_it_overdraws(
    daemon: RunningDaemon, link: Link
) -> None:
    advice = authorization(pan=LOW, amount=8000, t="0120", **{"39": "00"})
    response = link.exchange(advice)
    assert (response["t"], response["39"]) == ("0130", "00")
    assert balances(daemon, "demo-low") == (5000, 8000)  # available is now -30.00 EUR


def test_completion_captures_the_hold_for_its_final_amount(
    daemon: RunningDaemon, link: Link
) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=4000)  # e.g. a restaurant, before the tip
    assert link.exchange(original)["39"] == "00"
    completion = follow_up("0220", original, 4600, **{"90": original_data(original)})
    response = link.exchange(completion)
    assert (response["t"], response["39"]) == ("0230", "00")
    assert balances(daemon) == (posted - 4600, held)
    # Without a matching hold the completion is a force post.
    ghost = authorization(pan=LOAD, amount=300)
    force = follow_up("0220", ghost, 300, **{"90": original_data(ghost)})
    assert link.exchange(force)["39"] == "00"
    assert balances(daemon) == (posted - 4900, held)


def test_partial_approval_when_the_terminal_supports_it(daemon: RunningDaemon, link: Link) -> None:
    supported = "R" + "61" + "03" + "100"  # field 48: TCC, subelement 61 position 1 = 1
    response = link.exchange(authorization(pan=LOW, amount=8000, **{"48": supported}))
    assert (response["39"], response["4"]) == ("10", f"{5000:012d}")
    assert balances(daemon, "demo-low") == (5000, 5000)
    unsupported = link.exchange(authorization(pan=LOW, amount=8000))
    assert unsupported["39"] == "51"


def test_an_answered_batch_reaches_lmdb_at_its_checkpoint_without_a_read(
    daemon: RunningDaemon, link: Link
) -> None:
    # No settle() here: the daemon's own timer checkpoints within ledger.checkpoint_seconds
    # (5 ms), and another process reading LMDB sees the batch from then.
    before = int(sample(scrape(daemon), "processor_ledger_checkpoint_seconds_count", 0.0))
    request = authorization(pan=LOAD, amount=777)
    assert link.exchange(request)["39"] == "00"
    deadline = time.monotonic() + 5.0
    while True:
        ledger = Ledger(daemon.ledger, readonly=True)
        try:
            with ledger.read() as reader:
                holds = [h.amount for h in reader.account_holds("demo-main") if h.amount == 777]
        finally:
            ledger.close()
        if holds or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert holds == [777]
    after = sample(scrape(daemon), "processor_ledger_checkpoint_seconds_count", 0.0)
    assert after > before


def test_hold_lifetime_by_mcc(daemon: RunningDaemon, link: Link) -> None:
    hotel = authorization(pan=LOAD, amount=100, **{"18": "7011"})
    shop = authorization(pan=LOAD, amount=100, **{"18": "5411"})
    assert link.exchange(hotel)["39"] == link.exchange(shop)["39"] == "00"
    daemon.settle()
    ledger = Ledger(daemon.ledger, readonly=True)
    try:
        with ledger.read() as reader:
            holds = {h.mcc: h.expires_ms - h.created_ms for h in reader.account_holds("demo-main")}
    finally:
        ledger.close()
    assert holds == {"7011": 30 * 86400 * 1000, "5411": 7 * 86400 * 1000}


def test_kill9_mid_stream_loses_no_answered_change(daemon: RunningDaemon) -> None:
    link = daemon.connect()
    posted, held = balances(daemon)
    expected_posted, expected_held = posted, held
    originals = [authorization(pan=LOAD, amount=100 + n) for n in range(30)]
    for request in originals:
        link.send_fields(request)
    answers = {link.receive_fields()["11"]: None for _ in originals}
    assert len(answers) == 30
    expected_held += sum(100 + n for n in range(30))
    stream: list[dict[str, str]] = []
    for n, original in enumerate(originals):
        if n % 3 == 0:
            stream.append(follow_up("0400", original, 100 + n, **{"90": original_data(original)}))
            expected_held -= 100 + n
        elif n % 3 == 1:
            stream.append(follow_up("0220", original, 200 + n, **{"90": original_data(original)}))
            expected_held -= 100 + n
            expected_posted -= 200 + n
        else:
            stream.append(authorization(pan=LOAD, amount=50, t="0200"))
            expected_posted -= 50
    for request in stream:
        link.send_fields(request)
    codes = [link.receive_fields()["39"] for _ in stream]
    assert codes == ["00"] * len(stream)
    daemon.kill9()  # every answer above was sent once durable (in the write-ahead log)
    link.close()
    # LMDB alone may lack the last few milliseconds of them; any read-write open replays the
    # log (a tool's, as here, or the restart's below).
    Ledger(daemon.ledger).close()
    assert balances(daemon) == (expected_posted, expected_held)
    restarted = RunningDaemon(daemon.ledger).start()
    try:
        again = restarted.connect()
        again.send_fields(stream[0])
        assert decode(again.receive())["39"] == "00"  # a retransmission: nothing changes
        again.close()
        assert balances(restarted) == (expected_posted, expected_held)
    finally:
        restarted.stop()


def test_sweeper_releases_expired_holds(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text(
        "[programme]\nhold_lifetime_seconds = 1\nsweep_interval_seconds = 1\n"
        "[programme.hold_lifetime_by_mcc]\n"
    )
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        link = running.connect()
        posted, held = balances(running)
        assert (
            link.exchange(authorization(pan=LOAD, amount=900, **{"11": next_stan()}))["39"] == "00"
        )
        assert balances(running) == (posted, held + 900)
        import time

        deadline = time.monotonic() + 10
        while balances(running) != (posted, held) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert balances(running) == (posted, held)
        link.close()
    finally:
        running.stop()


def test_foreign_currency_authorisations(tmp_path: Path) -> None:
    rates = tmp_path / "rates.toml"
    rates.write_text('[[rates]]\nfrom = "USD"\nto = "EUR"\nrate = "0.92"\n')
    config = tmp_path / "processor.toml"
    config.write_text(f'[programme]\nrates_file = "{rates}"\nfx_markup_bps = 100\n')
    running = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        link = running.connect()
        posted, held = balances(running)
        # 10.00 USD at 0.92 + 1 % markup = 9.29 EUR held; the answer carries 6 and 51.
        converted = link.exchange(authorization(pan=LOAD, amount=1000, **{"49": "840"}))
        assert (converted["39"], converted["6"], converted["51"]) == ("00", f"{929:012d}", "978")
        assert converted["4"] == f"{1000:012d}"
        # The network's own billing amount in the account currency wins over our rate.
        billed = link.exchange(
            authorization(pan=LOAD, amount=1000, **{"49": "840", "6": f"{950:012d}", "51": "978"})
        )
        assert (billed["39"], billed["6"]) == ("00", f"{950:012d}")
        assert balances(running) == (posted, held + 929 + 950)
        # No rate and no billing amount: declined 57.
        no_rate = link.exchange(authorization(pan=LOAD, amount=1000, **{"49": "826"}))
        assert no_rate["39"] == "57"
        link.close()
    finally:
        running.stop()


def test_a_second_completion_does_not_post_twice(daemon: RunningDaemon, link: Link) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=1000)
    assert link.exchange(original)["39"] == "00"
    first = follow_up("0220", original, 1100, **{"90": original_data(original)})
    second = follow_up("0220", original, 1100, **{"90": original_data(original)})
    assert link.exchange(first)["39"] == link.exchange(second)["39"] == "00"
    assert balances(daemon) == (posted - 1100, held)
    single = authorization(pan=LOAD, amount=500, t="0200")
    assert link.exchange(single)["39"] == "00"
    completion = follow_up("0220", single, 500, **{"90": original_data(single)})
    assert link.exchange(completion)["39"] == "00"
    assert balances(daemon) == (posted - 1600, held)


def test_ledger_show_lists_a_cards_recent_transactions(daemon: RunningDaemon, link: Link) -> None:
    from harness import run_cli

    original = authorization(pan=MAIN, amount=1234)
    approved = link.exchange(original)
    assert approved["39"] == "00"
    assert link.exchange(authorization(pan=MAIN, amount=600_000))["39"] == "61"
    reversal = follow_up("0400", original, 1234, **{"90": original_data(original)})
    assert link.exchange(reversal)["39"] == "00"
    shown = run_cli("ledger", "show", "--ledger", str(daemon.ledger), "--pan-stdin", stdin=MAIN)
    assert shown.returncode == 0, shown.stderr
    history = shown.stdout.split("recent transactions of 476173******0010: 3\n")[1]
    lines = history.splitlines()[:3]
    assert any("0100" in line and "12.34 EUR" in line and approved["38"] in line for line in lines)
    assert any("61 per_authorization_amount_limit" in line for line in lines)
    assert any("0400" in line and "00 reversed" in line for line in lines)
    assert MAIN not in shown.stdout


def test_a_usable_field_90_is_never_second_guessed_by_rrn(
    daemon: RunningDaemon, link: Link
) -> None:
    posted, held = balances(daemon)
    original = authorization(pan=LOAD, amount=800, **{"37": "555555555555"})
    assert link.exchange(original)["39"] == "00"
    ghost = authorization(pan=LOAD, amount=800)  # never sent
    # Same acquirer, STAN and RRN as the original, but field 90 names the ghost: no match.
    reversal = dict(original, t="0400", **{"7": "1124122222", "90": original_data(ghost)})
    assert link.exchange(reversal)["39"] == "25"
    assert balances(daemon) == (posted, held + 800)


def test_kill9_before_the_checkpoint_replays_the_log_on_restart(tmp_path: Path) -> None:
    # A checkpoint a second away: the kill certainly lands before it, so every change below
    # is in the write-ahead log only when the daemon dies, and the restart must replay it.
    config = tmp_path / "processor.toml"
    config.write_text("[ledger]\ncheckpoint_seconds = 1.0\n")
    daemon = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        link = daemon.connect()
        # The demo load and the start-up's own writes were checkpointed by its reads.
        posted, held = balances(daemon)
        requests = [authorization(pan=LOAD, amount=300 + n) for n in range(20)]
        # One at a time: each its own small batch, which the log takes (a batch of
        # limits.logged_batch_requests_max or more would commit through LMDB).
        assert {link.exchange(request)["39"] for request in requests} == {"00"}
        daemon.kill9()
        link.close()
    finally:
        daemon.stop()
    lmdb_alone = Ledger(tmp_path / "ledger", readonly=True)
    try:
        assert lmdb_alone.unreplayed >= 1  # a reader is told, and does not show them yet
        with lmdb_alone.read() as reader:
            account = reader.account("demo-main")
            assert account is not None and account.held == held
    finally:
        lmdb_alone.close()
    restarted = RunningDaemon(tmp_path / "ledger", config=config).start()
    try:
        assert "from the write-ahead log" in restarted.stderr()
        assert balances(restarted) == (posted, held + sum(300 + n for n in range(20)))
        again = restarted.connect()
        again.send_fields(requests[0])  # a retransmission: the replayed answer, no new hold
        assert decode(again.receive())["39"] == "00"
        again.close()
        assert balances(restarted) == (posted, held + sum(300 + n for n in range(20)))
    finally:
        restarted.stop()
