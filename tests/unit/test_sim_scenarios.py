"""The simulator's scenarios against fake peers: what they prove, what they leave behind, and
how a run ends when the peer fails."""

from __future__ import annotations

import asyncio
import time

import pytest
from sim_fakes import FakeApi, FakeIssuer

from processor.sim.scenarios import ACTIVE, DAILY_COUNT, Row, run_rows, run_scenarios


def rows_against(issuer: FakeIssuer, names: list[str], **kwargs: object) -> list[Row]:
    async def main() -> list[Row]:
        port = await issuer.start()
        try:
            return await run_rows("127.0.0.1", port, names, "len2", **kwargs)  # type: ignore[arg-type]
        finally:
            await issuer.stop()

    return asyncio.run(main())


def test_retransmission_passes_when_held_once_and_reverses_it() -> None:
    issuer = FakeIssuer()
    (row,) = rows_against(issuer, ["retransmission"])
    assert row.ok, row
    assert issuer.available == 1_000_000  # the one hold was reversed
    assert len(issuer.reversed_stans()) == 1


def test_retransmission_fails_a_daemon_that_approves_each_copy() -> None:
    # Byte-identical answers prove nothing: a stateless issuer gives them and holds three times.
    (row,) = rows_against(FakeIssuer(stateless=True), ["retransmission"])
    assert not row.ok
    assert row.received.startswith("available moved by 3702, not 1234 once"), row


def test_an_interrupted_scenario_is_reversed_over_a_new_link() -> None:
    # The link closes at the second swipe of daily_count_limit: the first swipe's approval, and
    # the second whose answer never came, are reversed on a new link, not left until midnight.
    issuer = FakeIssuer(close_at=2)
    (row,) = rows_against(issuer, ["daily_count_limit"])
    assert not row.ok and "LinkDown" in row.received
    assert issuer.links == 2
    first, second = (r["11"] for r in issuer.requests[:2])
    assert issuer.reversed_stans() == [first, second]
    assert issuer.available == 1_000_000
    assert row.after == []


def test_what_cannot_be_reversed_is_named_with_a_masked_pan() -> None:
    # The second swipe is never answered, and the link dies at the first reversal.
    issuer = FakeIssuer(hang_at=2, close_at=3)
    (row,) = rows_against(issuer, ["daily_count_limit"], run_seconds=0.5)
    assert row.after, row
    assert all(line.startswith("not reversed: 0100 476173******0119") for line in row.after)
    assert DAILY_COUNT not in " ".join([*row.after, row.received])


def test_ctrl_c_still_reverses_and_reports_the_row() -> None:
    issuer = FakeIssuer(hang_at=2)
    seen: list[Row] = []

    async def main() -> None:
        port = await issuer.start()
        task = asyncio.create_task(
            run_rows("127.0.0.1", port, ["daily_count_limit"], "len2", on_row=seen.append)
        )
        while len(issuer.requests) < 2:
            await asyncio.sleep(0.01)
        task.cancel()  # what asyncio.run does on Ctrl-C
        with pytest.raises(asyncio.CancelledError):
            await task
        await issuer.stop()

    asyncio.run(main())
    first, second = (r["11"] for r in issuer.requests[:2])
    assert issuer.reversed_stans() == [first, second]
    assert issuer.available == 1_000_000
    assert [row.received for row in seen] == ["interrupted"]


def test_a_dead_link_fails_the_rest_at_once() -> None:
    started = time.monotonic()
    rows = rows_against(FakeIssuer(close_at=2), ["echo", "sign_on", "approve", "unknown_card"])
    assert time.monotonic() - started < 2.0
    assert [row.ok for row in rows] == [True, False, False, False]
    assert rows[1].received == "LinkDown: link closed by the processor"
    assert rows[3].received == "not run: the link is down (link closed by the processor)"


def test_a_silent_daemon_is_bounded_and_each_row_printed_when_known() -> None:
    seen: list[tuple[float, str]] = []
    started = time.monotonic()
    rows = rows_against(
        FakeIssuer(silent=True),
        ["echo", "sign_on", "unknown_card"],
        run_seconds=0.5,
        on_row=lambda row: seen.append((time.monotonic() - started, row.name)),
    )
    assert time.monotonic() - started < 2.0
    assert [name for _, name in seen] == ["echo", "sign_on", "unknown_card"]
    assert rows[0].received == "not finished within the run's time bound"
    assert rows[2].received == "not run: the run's 0.5 s are up"


def test_rows_are_reported_as_they_finish() -> None:
    # The sign-on is answered only once the echo's row was reported: a run that reported its
    # rows at the end would wait for it until its time bound.
    release = asyncio.Event()
    issuer = FakeIssuer(release=release, held_from=2)
    rows = rows_against(
        issuer, ["echo", "sign_on"], run_seconds=3.0, on_row=lambda _: release.set()
    )
    assert [row.ok for row in rows] == [True, True], rows


def test_every_scenario_skipped_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    issuer = FakeIssuer()

    async def serve() -> int:
        return await issuer.start()

    loop = asyncio.new_event_loop()
    try:
        port = loop.run_until_complete(serve())

        async def run() -> int:
            return await asyncio.to_thread(
                run_scenarios, "127.0.0.1", port, ["freeze_then_swipe", "cvc2_lockout"]
            )

        assert loop.run_until_complete(run()) == 2
    finally:
        loop.run_until_complete(issuer.stop())
        loop.close()
    assert "every scenario was skipped" in capsys.readouterr().out


def test_freeze_then_swipe_registers_a_new_card_each_run() -> None:
    # The API here forgets idempotency keys, as retention does after days: a fixed card under
    # a fixed key would get 409 card_exists on the second run.
    issuer = FakeIssuer()
    api = FakeApi(issuer)

    async def main() -> list[Row]:
        port = await issuer.start()
        url, runner = await api.start()
        try:
            rows = []
            for _ in range(2):
                rows += await run_rows(
                    "127.0.0.1", port, ["freeze_then_swipe"], "len2", url, "token"
                )
            return rows
        finally:
            await runner.cleanup()
            await issuer.stop()

    rows = asyncio.run(main())
    assert [row.received for row in rows] == ["00 62 00", "00 62 00"], rows
    assert len(set(api.cards.values())) == 2
    assert issuer.available == 1_000_000
    assert ACTIVE not in api.cards.values()
