"""The Link protocol and the daemon's dispatch, driven with a fake transport (no socket)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import iso8583
import msgspec
import pytest

from processor import limits
from processor.authorizer import CommandRefused
from processor.config import Config
from processor.ledger.load import load_path
from processor.ledger.store import Ledger, Writer
from processor.metrics import Metrics
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.server.daemon import Daemon
from processor.server.link import Link, Listener
from processor.server.pacing import Pacer
from processor.wire.codec import Codec
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

SPEC = load_spec()
CODEC = Codec(SPEC)
FRAMER = Framer("len2", max_frame_bytes=8192)


class FakeTransport:
    def __init__(self, peer_host: str = "127.0.0.1") -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.reading = True
        self.peer_host = peer_host

    def get_extra_info(self, name: str) -> object:
        return (self.peer_host, 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def frames(self) -> list[dict[str, str]]:
        framer = Framer("len2", max_frame_bytes=8192)
        out = []
        for data in self.writes:
            for _, message in framer.feed(data):
                out.append(iso8583.decode(message, SPEC.iso)[0])
        return out


def make_daemon(
    tmp_path: Path,
    batch_size_max: int = 256,
    batch_seconds_max: float = 0.005,
    *,
    logging: bool = False,
    **listener: object,
) -> Daemon:
    """A daemon on a ledger without fsync, or, `logging`, with fsync and the write-ahead log
    (as the daemon runs by default with one worker)."""
    durability: Literal["fsync", "process"] = "fsync" if logging else "process"
    config = Config()
    config = msgspec.structs.replace(
        config,
        listeners=(msgspec.structs.replace(config.listeners[0], **listener),),
        ledger=msgspec.structs.replace(
            config.ledger, path=str(tmp_path), durability=durability, batch_size_max=batch_size_max
        ),
        server=msgspec.structs.replace(config.server, batch_seconds_max=batch_seconds_max),
    )
    hasher = PanHasher(b"protocol-test-key")
    ledger = Ledger(
        tmp_path,
        durability=durability,
        map_size_bytes=64 << 20,
        write_ahead_log_bytes=(1 << 20) if logging else 0,
    )
    load_path(ledger, demo_data_path(), hasher)
    return Daemon(config, ledger, hasher, Metrics())


def auth_frame(stan: int, pan: str = "4761739001010085", amount: int = 100, **extra: str) -> bytes:
    fields = {
        "t": "0100",
        "2": pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1124101010",
        "11": f"{stan:06d}",
        "18": "5411",
        "32": "123456",
        "49": "978",
    }
    return FRAMER.frame(b"", CODEC.encode({**fields, **extra}))


def terminal_frame(stan: int, terminal: str) -> bytes:
    return auth_frame(stan, **{"41": terminal})


def echo_frame(stan: int) -> bytes:
    fields = {"t": "0800", "7": "1124101010", "11": f"{stan:06d}", "70": "301"}
    return FRAMER.frame(b"", CODEC.encode(fields))


def new_link(daemon: Daemon) -> Link:
    return Link(daemon, daemon.listeners[0])


def frames_per_write(transport: FakeTransport, since: int = 0) -> list[int]:
    """Frames in each write to `transport` from write `since` on: one write per batch."""
    framer = Framer("len2", max_frame_bytes=8192)
    return [len(framer.feed(data)) for data in transport.writes[since:]]


def sender(link: Link, count: int, first: int) -> Callable[[], None]:
    """What sends `count` 0100s at once on `link`, STANs from `first` on."""
    frames = b"".join(auth_frame(stan) for stan in range(first, first + count))
    return lambda: link.data_received(frames)


def run(coroutine_body, turns: int = 5, until: Callable[[], bool] | None = None):  # type: ignore[no-untyped-def]
    async def main() -> None:
        coroutine_body()
        for _ in range(turns):  # let call_soon'd group commits and backlogged frames run
            await asyncio.sleep(0)
        # A turn's share of a backlog is bounded in time as well as in frames: on a busy
        # machine the turns above may not reach `until`; more turns, bounded in time, do.
        deadline = time.monotonic() + 30
        while until is not None and not until() and time.monotonic() < deadline:
            await asyncio.sleep(0)

    asyncio.run(main())


def test_frames_arriving_together_commit_once_and_write_once(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(b"".join(auth_frame(stan) for stan in range(1, 11)))

    run(body)
    assert len(transport.writes) == 1  # one transport.write per link per batch
    frames = transport.frames()
    assert [f["11"] for f in frames] == [f"{s:06d}" for s in range(1, 11)]
    assert {f["39"] for f in frames} == {"00"}
    assert daemon.metrics.batch_size._sum.get() == 10  # one batch of ten
    daemon.ledger.close()


def test_batches_are_bounded(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, batch_size_max=4)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(b"".join(auth_frame(stan) for stan in range(1, 11)))

    run(body)
    assert len(transport.frames()) == 10
    assert len(transport.writes) == 3  # 4 + 4 + 2
    daemon.ledger.close()


def test_past_the_queue_limit_a_request_is_answered_91_at_once_and_reading_goes_on(
    tmp_path: Path,
) -> None:
    daemon = make_daemon(tmp_path, in_flight_per_link_max=4)
    link, transport = new_link(daemon), FakeTransport()
    seen: list[tuple[bool, int, list[dict[str, str]]]] = []

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(b"".join(auth_frame(stan) for stan in range(1, 7)))
        seen.append((transport.reading, link.in_flight, transport.frames()))

    run(body)
    [(reading, in_flight, at_once)] = seen
    assert reading and in_flight == 4  # queued: four; reading never paused for them
    assert [(f["11"], f["39"]) for f in at_once] == [("000005", "91"), ("000006", "91")]
    frames = transport.frames()
    assert sorted((f["11"], f["39"]) for f in frames) == [
        *((f"{stan:06d}", "00") for stan in range(1, 5)),
        ("000005", "91"),
        ("000006", "91"),
    ]
    assert link.in_flight == 0
    assert daemon.metrics.requests.labels("0100", "91", "issuer_overloaded")._value.get() == 2
    daemon.ledger.close()


def test_an_advice_past_the_queue_limit_is_queued_and_pauses_reading(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, in_flight_per_link_max=2)
    link, transport = new_link(daemon), FakeTransport()
    seen: list[bool] = []

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(auth_frame(1) + auth_frame(2) + advice_frame(3))
        seen.append(transport.reading)

    run(body)
    assert seen == [False]  # three queued, one past the limit: the advice waits, reading pauses
    assert sorted((f["t"], f["39"]) for f in transport.frames()) == [
        ("0110", "00"),
        ("0110", "00"),
        ("0130", "00"),
    ]
    assert transport.reading  # resumed once the queue was answered
    daemon.ledger.close()


def test_batches_take_requests_round_robin_across_links(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, batch_size_max=4)
    greedy, greedy_transport = new_link(daemon), FakeTransport()
    quiet, quiet_transport = new_link(daemon), FakeTransport()
    order: list[str] = []
    original = daemon.authorizer.run_batch

    def recording(requests, commands, now):  # type: ignore[no-untyped-def]
        order.append(" ".join(r.terminal or "?" for r in requests))
        return original(requests, commands, now)

    daemon.authorizer.run_batch = recording  # type: ignore[method-assign]

    def body() -> None:
        greedy.connection_made(greedy_transport)  # type: ignore[arg-type]
        quiet.connection_made(quiet_transport)  # type: ignore[arg-type]
        greedy.data_received(b"".join(terminal_frame(stan, "GREEDY01") for stan in range(1, 11)))
        quiet.data_received(terminal_frame(100, "QUIET001") + terminal_frame(101, "QUIET001"))

    run(body)
    # Ten queued on one link before two on the other: the quiet link's are in the first batch.
    assert order[0].split() == ["GREEDY01", "QUIET001", "GREEDY01", "QUIET001"]
    assert len(greedy_transport.frames()) == 10 and len(quiet_transport.frames()) == 2
    daemon.ledger.close()


def test_a_reversal_on_another_link_is_never_decided_before_its_original(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    busy, busy_transport = new_link(daemon), FakeTransport()
    other, other_transport = new_link(daemon), FakeTransport()
    original_data = f"0100{3:06d}1124101010{'123456':0>11}{'0' * 11}"  # stan 3 of the busy link

    def body() -> None:
        busy.connection_made(busy_transport)  # type: ignore[arg-type]
        other.connection_made(other_transport)  # type: ignore[arg-type]
        busy.data_received(b"".join(auth_frame(stan) for stan in range(1, 4)))
        # Round-robin alone would take it second, before stan 3 it reverses.
        other.data_received(auth_frame(3, **{"t": "0400", "90": original_data}))

    run(body)
    [reversal] = other_transport.frames()
    assert (reversal["t"], reversal["39"]) == ("0410", "00")
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == 200  # stans 1 and 2; 3 was reversed
    daemon.ledger.close()


@pytest.mark.parametrize("turn_ns", [10**12, 0])
def test_a_read_of_many_frames_is_decoded_a_share_per_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, turn_ns: int
) -> None:
    from processor import limits
    from processor.server import link as link_module

    # A turn's share: frames_per_turn_max frames, or fewer once turn_seconds_max has passed
    # (checked after each chunk). The clock is taken out of it: all the time there is, or none
    # (one chunk per turn).
    monkeypatch.setattr(link_module, "_TURN_NS", turn_ns)
    share = limits.frames_per_turn_max if turn_ns else limits.frames_per_chunk
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    count = limits.frames_per_turn_max * 2 + 5
    after_read: list[tuple[int, bool]] = []

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(b"".join(echo_frame(stan) for stan in range(1, count + 1)))
        after_read.append((len(transport.frames()), transport.reading))

    run(body, turns=count // share + 2)
    # One turn's share answered at once, in one write; reading paused while the rest waits.
    assert after_read == [(share, False)]
    assert len(transport.writes[0]) > 0 and len(transport.frames()) == count
    assert [f["11"] for f in transport.frames()] == [f"{s:06d}" for s in range(1, count + 1)]
    assert transport.reading
    daemon.ledger.close()


def test_turns_of_reading_are_shorter_while_a_light_link_is_protected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from processor.server import link as link_module

    # All the time there is for a turn, or, protecting a light link, none: one chunk per turn.
    monkeypatch.setattr(link_module, "_TURN_NS", 10**12)
    monkeypatch.setattr(link_module, "_LIGHT_TURN_NS", 0)
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    count = limits.frames_per_chunk * 3
    after_read: list[int] = []

    def read(first: int) -> Callable[[], None]:
        frames = b"".join(echo_frame(stan) for stan in range(first, first + count))

        def body() -> None:
            link.data_received(frames)
            after_read.append(len(transport.frames()))

        return body

    link.connection_made(transport)  # type: ignore[arg-type]
    run(read(1), turns=10)
    daemon.protecting_light_link = True  # as a batch cut for a light link leaves it
    run(read(count + 1), turns=10)
    # Echoes are answered in the turn that reads them: all in one turn, then one chunk.
    assert after_read == [count, count + limits.frames_per_chunk]
    assert len(transport.frames()) == 2 * count
    daemon.ledger.close()


def test_batches_are_bounded_in_time_unless_saturated_with_no_light_link_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from processor.server import link as link_module

    daemon = make_daemon(tmp_path)
    # As if batches had measured that 8 requests fill the time budget (and kept measuring so).
    daemon._pacer.size = 8
    monkeypatch.setattr(Pacer, "measured", lambda *args: None)
    # Turns bounded in frames only: on a busy machine the time bound split a turn of 40, and
    # then reading lagged and the batches stayed short (what the last step below tests).
    monkeypatch.setattr(link_module, "_TURN_NS", 10**12)
    monkeypatch.setattr(link_module, "_LIGHT_TURN_NS", 10**12)
    heavy, heavy_transport = new_link(daemon), FakeTransport()
    light, light_transport = new_link(daemon), FakeTransport()

    def alone() -> None:
        heavy.connection_made(heavy_transport)  # type: ignore[arg-type]
        sender(heavy, 40, 1)()

    run(alone, turns=20)
    # A queue longer than a batch, but only for a moment: time-bounded batches.
    assert frames_per_write(heavy_transport, 0) == [8] * 5

    monkeypatch.setattr(limits, "saturated_seconds_min", 0.0)  # saturated from the first flush
    before = len(heavy_transport.writes)
    run(sender(heavy, 40, 100))
    # Forty in flight on one link and no other: nobody gains from short batches, one takes all.
    assert frames_per_write(heavy_transport, before) == [40]

    def beside_a_light_link() -> None:
        light.connection_made(light_transport)  # type: ignore[arg-type]
        light.data_received(auth_frame(1000))  # one in flight, just now: a light link
        sender(heavy, 40, 200)()

    daemon._light_checked_until = 0.0  # looked for again at once (every 50 ms otherwise)
    before = len(heavy_transport.writes)
    run(beside_a_light_link, turns=20)
    sizes = frames_per_write(heavy_transport, before)
    assert sum(sizes) == 40 and max(sizes) <= 8  # batches of the pacer's size
    assert [f["39"] for f in light_transport.frames()] == ["00"]

    # The light link quiet for longer than limits.light_link_seconds: not about any more.
    light.requested_at -= limits.light_link_seconds + 1
    daemon._light_checked_until = 0.0
    before = len(heavy_transport.writes)
    run(sender(heavy, 40, 300))
    assert frames_per_write(heavy_transport, before) == [40]

    # More arrived than a turn reads (reading lags): short batches, turns of reading between.
    before = len(heavy_transport.writes)
    run(sender(heavy, 300, 400), turns=40)
    sizes = frames_per_write(heavy_transport, before)
    assert sum(sizes) == 300 and sizes[0] == 8
    assert daemon.backlogged_links == 0  # read to the end
    daemon.ledger.close()


@pytest.mark.parametrize("logging", [False, True])
def test_a_light_links_request_beside_a_busy_links_goes_in_a_short_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logging: bool
) -> None:
    daemon = make_daemon(tmp_path, logging=logging)
    assert daemon.ledger.logging == logging
    daemon._pacer.size = 32  # as if 32 requests fill the time budget
    monkeypatch.setattr(Pacer, "measured", lambda *args: None)
    busy, busy_transport = new_link(daemon), FakeTransport()
    light, light_transport = new_link(daemon), FakeTransport()

    def body() -> None:
        busy.connection_made(busy_transport)  # type: ignore[arg-type]
        light.connection_made(light_transport)  # type: ignore[arg-type]
        busy.data_received(b"".join(auth_frame(stan) for stan in range(1, 41)))
        light.data_received(auth_frame(100))

    committed = daemon.ledger.env.info()["last_txnid"]
    run(body, turns=20)
    batches = frames_per_write(busy_transport)
    if logging:  # the batch of 3 logged; the busy link's next one committed it with its own
        assert daemon.ledger._pending is None
        assert daemon.ledger.env.info()["last_txnid"] == committed + 2  # that one, then 6
    # The first batch takes the light link's request with 7 of the busy link's (round-robin,
    # cut to limits.light_batch_size), or with 2 while the ledger logs (a batch of 3 is logged:
    # one flush); then the busy link's rest in batches of the pacer's size.
    first = limits.logged_batch_requests_max - 1 if logging else limits.light_batch_size
    assert batches == [first - 1, 32, 40 - 32 - (first - 1)]
    assert [f["39"] for f in light_transport.frames()] == ["00"]
    assert all(f["39"] == "00" for f in busy_transport.frames())
    daemon.ledger.close()


def test_a_greedy_links_batches_are_shorter_while_a_light_link_is_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from processor.server import link as link_module

    # Every read decoded in one turn, however slow the machine: in flight as sent.
    monkeypatch.setattr(link_module, "_TURN_NS", 10**12)
    daemon = make_daemon(tmp_path)
    # As if batches had measured 20 us per request and 0.5 ms per commit, with 32 filling the
    # time budget: 25 fill limits.light_batch_seconds (1 ms; the commit takes half).
    pacer = daemon._pacer
    pacer.size, pacer._apply_per_request, pacer._commit = 32, 0.00002, 0.0005
    monkeypatch.setattr(Pacer, "measured", lambda *args: None)
    assert pacer.size_within(limits.light_batch_seconds) == 25
    greedy, greedy_transport = new_link(daemon), FakeTransport()
    light, light_transport = new_link(daemon), FakeTransport()
    protected: list[bool] = []  # per batch: whether it was cut for a light link
    batch_size = daemon._batch_size

    def recording_batch_size() -> int:
        size = batch_size()
        protected.append(daemon.protecting_light_link)
        return size

    monkeypatch.setattr(daemon, "_batch_size", recording_batch_size)

    def light_first() -> None:
        greedy.connection_made(greedy_transport)  # type: ignore[arg-type]
        light.connection_made(light_transport)  # type: ignore[arg-type]
        light.data_received(auth_frame(1000))

    run(light_first)
    assert [f["39"] for f in light_transport.frames()] == ["00"]
    # The light link answered, nothing queued, but about: its next request would wait for the
    # batch under way, so a greedy link's (more than greedy_link_in_flight_min in flight)
    # are the shorter ones, until it has no more than that in flight.
    count = limits.greedy_link_in_flight_min + 36  # 100
    protected.clear()
    run(sender(greedy, count, 1), turns=20)
    assert frames_per_write(greedy_transport, 0) == [25, 25, 32, 18]
    assert protected == [True, True, False, False]  # turns of reading shorter meanwhile

    # A busy link that is not greedy (more than light_link_in_flight_max, not more than
    # greedy_link_in_flight_min): the time budget's batches.
    before = len(greedy_transport.writes)
    run(sender(greedy, 40, 200), turns=20)
    assert frames_per_write(greedy_transport, before) == [32, 8]

    # The light link quiet for longer than limits.light_link_seconds: not about any more.
    light.requested_at -= limits.light_link_seconds + 1
    daemon._light_checked_until = 0.0
    before = len(greedy_transport.writes)
    run(sender(greedy, count, 300), turns=20)
    assert frames_per_write(greedy_transport, before) == [32, 32, 32, 4]
    daemon.ledger.close()


def test_admission_answers_91_when_the_queue_would_outlast_the_deadline(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    # As if batches had measured 0.5 s per request and commits of no time: the deadline (1.5 s)
    # admits a queue of two requests (two thirds of the deadline would then be spent).
    daemon._pacer._apply_per_request = 0.5

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(b"".join(auth_frame(stan) for stan in range(1, 6)))

    run(body)
    codes = sorted((f["11"], f["39"]) for f in transport.frames())
    assert codes == [
        ("000001", "00"),
        ("000002", "00"),
        ("000003", "00"),
        ("000004", "91"),
        ("000005", "91"),
    ]
    daemon.ledger.close()


def test_bad_messages_answered_or_dropped_then_the_rate_closes(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, bad_messages_max=3)
    link, transport = new_link(daemon), FakeTransport()
    missing_mcc = CODEC.encode(
        {
            "t": "0100",
            "2": "4761739001010085",
            "3": "000000",
            "4": "000000000100",
            "7": "1124101010",
            "11": "000077",
            "32": "123456",
            "49": "978",
        }
    )

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", missing_mcc))  # answered 30
        link.data_received(FRAMER.frame(b"", b"XXXX"))  # dropped
        assert not transport.closed
        link.data_received(FRAMER.frame(b"", b"0100"))  # dropped; third: budget spent

    run(body)
    frames = transport.frames()
    assert [(f["t"], f["11"], f["39"]) for f in frames] == [("0110", "000077", "30")]
    assert transport.closed
    daemon.ledger.close()


def test_an_address_whose_links_keep_being_closed_for_bad_messages_is_refused_a_while(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    window = 0.2
    daemon = make_daemon(
        tmp_path, bad_messages_max=2, bad_links_per_address_max=3, bad_links_window_seconds=window
    )
    kept, kept_transport = new_link(daemon), FakeTransport()  # the address's good link
    closed: list[FakeTransport] = []
    late, late_transport = new_link(daemon), FakeTransport()
    other, other_transport = new_link(daemon), FakeTransport("192.0.2.9")

    def body() -> None:
        kept.connection_made(kept_transport)  # type: ignore[arg-type]
        for _ in range(3):  # three links closed for junk within the window
            link, transport = new_link(daemon), FakeTransport()
            closed.append(transport)
            link.connection_made(transport)  # type: ignore[arg-type]
            link.data_received(FRAMER.frame(b"", b"JUNK") * 2)
            link.connection_lost(None)
        late.connection_made(late_transport)  # type: ignore[arg-type]
        other.connection_made(other_transport)  # type: ignore[arg-type]
        kept.data_received(echo_frame(1))
        other.data_received(echo_frame(2))

    with caplog.at_level("WARNING", logger="processor.daemon"):
        run(body)
    assert all(transport.closed for transport in closed)
    assert late_transport.closed and not late_transport.writes  # refused at once
    assert [f["39"] for f in kept_transport.frames()] == ["00"]  # its open link keeps going
    assert [f["39"] for f in other_transport.frames()] == ["00"]  # another address: accepted
    refused = daemon.metrics.links_closed.labels("network", "bad_peer")._value.get()
    assert refused == 1
    assert any("refused: bad_peer" in r.getMessage() for r in caplog.records)

    time.sleep(window)  # the closes leave the window: accepted again
    again, again_transport = new_link(daemon), FakeTransport()
    run(lambda: again.connection_made(again_transport))  # type: ignore[arg-type]
    run(lambda: again.data_received(echo_frame(3)))
    assert [f["39"] for f in again_transport.frames()] == ["00"]
    daemon.ledger.close()


def test_framing_error_closes_the_link(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, max_frame_bytes=512)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(b"\x02\x01" + b"0" * 10)  # 513 > 512

    run(body)
    assert transport.closed and transport.writes == []
    daemon.ledger.close()


def test_frames_sent_whole_before_a_framing_error_are_answered_then_the_link_closes(
    tmp_path: Path,
) -> None:
    """They were thrown away with the error: never decoded, answered or counted, so the
    network waited out its timeout on each."""
    daemon = make_daemon(tmp_path, max_frame_bytes=512)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(echo_frame(7) + auth_frame(8, amount=300) + b"\x02\x01" + b"0" * 10)
        assert not transport.closed and not transport.reading  # answering first, reading no more

    run(body)
    assert [(f["t"], f["11"], f["39"]) for f in transport.frames()] == [
        ("0810", "000007", "00"),
        ("0110", "000008", "00"),
    ]
    assert transport.closed
    assert (
        daemon.metrics.child(daemon.metrics.bad_messages, "network", "framing", "")._value.get()
        == 1
    )
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == 300
    daemon.ledger.close()


def test_header_bytes_are_echoed(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, header_bytes=4)
    link, transport = new_link(daemon), FakeTransport()
    message = CODEC.encode({"t": "0800", "7": "1124101010", "11": "000001", "70": "301"})

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(
            Framer("len2", header_bytes=0, max_frame_bytes=8192).frame(b"HDR1", message)
        )

    run(body)
    framed = Framer("len2", header_bytes=4, max_frame_bytes=8192).feed(transport.writes[0])
    assert [header for header, _ in framed] == [b"HDR1"]
    daemon.ledger.close()


def test_link_closed_before_commit_still_records_the_decision(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(auth_frame(5, amount=700))
        transport.close()  # peer gone before the group commit runs

    run(body)
    assert transport.writes == []
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == 700  # a retransmission will get it
    daemon.ledger.close()


def test_a_failing_batch_is_answered_96_and_applies_nothing(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    real = daemon.authorizer.run_batch

    def broken(requests, commands, now):  # type: ignore[no-untyped-def]
        with daemon.ledger.write() as writer:  # a bug half-way through a write transaction
            account = writer.account("demo-main")
            assert account is not None
            account.held += 999
            writer.put_account(account)
            raise AssertionError("simulated bug")
        return real(requests, commands, now)

    daemon.authorizer.run_batch = broken  # type: ignore[method-assign]

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(auth_frame(1) + auth_frame(2))

    stopped: list[bool] = []
    daemon.on_fatal = lambda: stopped.append(True)
    run(body)
    assert [(f["11"], f["39"]) for f in transport.frames()] == [("000001", "96"), ("000002", "96")]
    assert link.in_flight == 0
    assert daemon.metrics.internal_errors._value.get() == 1
    assert stopped == [True]  # a failed assertion is a bug: the daemon is asked to stop
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == 0  # the transaction was aborted
    daemon.ledger.close()


def test_frames_after_the_budget_closes_the_link_are_not_applied(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, bad_messages_max=1)
    link, transport = new_link(daemon), FakeTransport()
    echo = CODEC.encode({"t": "0800", "7": "1124101010", "11": "000001", "70": "301"})

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", echo))
        link.data_received(FRAMER.frame(b"", b"JUNK") + auth_frame(9, amount=500))

    run(body)
    assert transport.closed
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == 0
    daemon.ledger.close()


def test_readyz_is_not_ready_while_the_ledger_is_unavailable(tmp_path: Path) -> None:
    from aiohttp.test_utils import make_mocked_request

    from processor.api.http import build_app, readyz

    daemon = make_daemon(tmp_path)
    app = build_app(daemon, None)

    async def ask() -> tuple[int, bytes]:
        response = await readyz(make_mocked_request("GET", "/readyz", app=app))
        return response.status, response.body  # type: ignore[return-value]

    assert asyncio.run(ask())[0] == 200
    daemon.ledger.env.close()  # the ledger goes away
    status, body = asyncio.run(ask())
    assert status == 503 and b"ledger unavailable" in body
    daemon.stopping = True
    assert asyncio.run(ask())[0] == 503


def test_readyz_is_not_ready_while_batches_fail_to_commit(tmp_path: Path) -> None:
    """Reads worked and writes did not (a disk error, a file size limit): every answer was 96
    and /readyz said ready."""
    from aiohttp.test_utils import make_mocked_request

    from processor.api.http import build_app, readyz
    from processor.authorizer import Outcome

    daemon = make_daemon(tmp_path)
    app = build_app(daemon, None)

    async def ask() -> tuple[int, bytes]:
        response = await readyz(make_mocked_request("GET", "/readyz", app=app))
        return response.status, response.body  # type: ignore[return-value]

    daemon._ledger_errors([Outcome({}, "0110", "96", "ledger_error:DiskError")])
    status, body = asyncio.run(ask())
    assert status == 503 and b"ledger_error:DiskError" in body
    daemon._ledger_errors([Outcome({}, "0110", "00", "approved")])  # a batch commits again
    assert asyncio.run(ask())[0] == 200
    daemon.ledger.close()


def freeze_card(pan: str) -> Callable[[Writer, int], str]:
    """A control-API style command: freeze the card, say which."""

    def command(writer: Writer, now_ms: int) -> str:
        key = PanHasher(b"protocol-test-key").card_key(pan)
        card = writer.card(key)
        assert card is not None
        card.status = "frozen"
        writer.put_card(key, card, card.account_id)
        return card.card_id

    return command


def refuse(writer: Writer, now_ms: int) -> None:
    raise CommandRefused(409, "nope", "refused before writing")


def test_a_command_is_applied_ahead_of_the_requests_of_its_batch(tmp_path: Path) -> None:
    """A change queued while requests wait goes first: they already see the card frozen."""
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    results: list[object] = []

    async def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(auth_frame(1) + auth_frame(2))  # queued, not yet committed
        results.append(await daemon.execute(freeze_card("4761739001010085")))
        results.append(await daemon.execute(refuse))

    asyncio.run(body())
    assert [(f["11"], f["39"]) for f in transport.frames()] == [("000001", "62"), ("000002", "62")]
    assert isinstance(results[0], str) and results[0].startswith("card_")
    refusal = results[1]
    assert isinstance(refusal, CommandRefused) and (refusal.status, refusal.code) == (409, "nope")
    assert daemon.metrics.batch_size._sum.get() == 2  # the two requests, in one batch
    daemon.ledger.close()


def test_a_command_in_a_failing_batch_raises_and_applies_nothing(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)

    def broken(writer: Writer, now_ms: int) -> None:
        freeze_card("4761739001010085")(writer, now_ms)
        raise RuntimeError("a bug after writing")

    async def body() -> None:
        with pytest.raises(RuntimeError, match="a bug after writing"):
            await daemon.execute(broken)

    asyncio.run(body())
    with daemon.ledger.read() as reader:
        card = reader.card(PanHasher(b"protocol-test-key").card_key("4761739001010085"))
        assert card is not None and card.status == "active"  # the transaction was aborted
    # Counted, as the batch's failure was before the batch ran again without it.
    assert daemon.metrics.internal_errors._value.get() == 1
    daemon.ledger.close()


ECHO_FIELDS = {"t": "0800", "7": "1124101010", "11": "000001", "70": "301"}


def test_bad_messages_close_a_link_only_at_their_rate() -> None:
    # bad_messages_max within bad_message_window_seconds: spread out, they never close it.
    listener = Listener(
        msgspec.structs.replace(
            Config().listeners[0], bad_messages_max=3, bad_message_window_seconds=60.0
        )
    )
    link = Link(None, listener)  # type: ignore[arg-type]  # bad_message() reads no daemon
    assert [link.bad_message(t) for t in (0.0, 30.0, 61.0, 100.0)] == [False] * 4
    assert link.bad_message(110.0)  # 61, 100, 110: three within 49 s


def test_a_first_message_in_another_dialect_closes_the_link_naming_the_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = make_daemon(tmp_path)  # an ascii-bitmap listener
    link, transport = new_link(daemon), FakeTransport()
    binary = Codec(load_spec("binary")).encode(ECHO_FIELDS)

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", binary) + FRAMER.frame(b"", binary))

    with caplog.at_level("WARNING", logger="processor.daemon"):
        run(body)
    assert transport.closed and transport.writes == []
    assert "binary bitmap on an ascii listener" in caplog.text
    closed = daemon.metrics.links_closed.labels("network", "dialect_mismatch")
    assert closed._value.get() == 1
    daemon.ledger.close()


def test_an_undecodable_message_after_good_ones_is_only_counted(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS)))
        link.data_received(FRAMER.frame(b"", b"JUNK"))
        link.data_received(auth_frame(3))

    run(body)
    assert not transport.closed
    assert [(f["t"], f["39"]) for f in transport.frames()] == [("0810", "00"), ("0110", "00")]
    dropped = daemon.metrics.bad_messages.labels("network", "undecodable", "t")
    assert dropped._value.get() == 1
    daemon.ledger.close()


def test_a_binary_listener_answers_in_binary_behind_a_self_counting_length(
    tmp_path: Path,
) -> None:
    daemon = make_daemon(tmp_path, bitmap="binary", framing="len2_inclusive")
    link, transport = new_link(daemon), FakeTransport()
    binary = Codec(load_spec("binary"))
    framer = Framer("len2_inclusive", max_frame_bytes=8192)

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(framer.frame(b"", binary.encode(ECHO_FIELDS)))

    run(body)
    (written,) = transport.writes
    assert int.from_bytes(written[:2], "big") == len(written)  # the prefix counts itself
    ((_, message),) = framer.feed(written)
    assert message[4:12] == bytes.fromhex("8220000002000000")  # bits 1, 7, 11, 39: 8 bytes
    assert iso8583.decode(message, load_spec("binary").iso)[0]["39"] == "00"
    daemon.ledger.close()


def test_a_flood_of_bad_messages_writes_a_bounded_number_of_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from processor import limits

    daemon = make_daemon(tmp_path, bad_messages_max=100_000)
    link, transport = new_link(daemon), FakeTransport()
    garbage = FRAMER.frame(b"", b"JUNK") * 1000

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS)))
        for _ in range(10):
            link.data_received(garbage)

    with caplog.at_level("WARNING", logger="processor.daemon"):
        run(body, turns=10_000 // limits.frames_per_turn_max + 10)  # a share per turn
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert len(lines) == limits.log_lines_per_kind_burst  # 10,000 bad frames, 5 lines
    assert not transport.closed
    suppressed = daemon.metrics.log_lines_suppressed.labels("undecodable")._value.get()
    assert suppressed == 10_000 - limits.log_lines_per_kind_burst
    dropped = daemon.metrics.bad_messages.labels("network", "undecodable", "t")._value.get()
    assert dropped == 10_000  # every one still counted
    daemon.ledger.close()


def test_a_peer_that_reconnects_does_not_get_a_fresh_log_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from processor import limits

    # Without refusing the address after its bad closes (tested on its own below): what is
    # counted here is the log budget over 200 reconnections.
    daemon = make_daemon(tmp_path, bad_messages_max=3, bad_links_per_address_max=0)
    transports: list[FakeTransport] = []

    def body() -> None:
        for _ in range(200):  # each link: a good echo, then junk until it is closed
            link, transport = new_link(daemon), FakeTransport()
            transports.append(transport)
            link.connection_made(transport)  # type: ignore[arg-type]
            link.data_received(FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS)))
            link.data_received(FRAMER.frame(b"", b"JUNK") * 3)
            link.connection_lost(None)

    with caplog.at_level("INFO", logger="processor.daemon"):
        run(body)
    assert all(transport.closed for transport in transports)  # the junk closed every one
    messages = [r.getMessage() for r in caplog.records]
    undecodable = [m for m in messages if "undecodable" in m]
    assert len(undecodable) == limits.log_lines_per_kind_burst  # 600 bad frames, 5 lines
    opened = [m for m in messages if "link opened" in m]
    assert len(opened) == limits.log_link_lines_burst  # 200 links, 64 lines
    suppressed = daemon.metrics.log_lines_suppressed
    assert suppressed.labels("undecodable")._value.get() == 600 - limits.log_lines_per_kind_burst
    assert suppressed.labels("link_opened")._value.get() == 200 - limits.log_link_lines_burst
    daemon.ledger.close()


def counting_diagnoses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The frames the daemon runs its dialect diagnosis on, from now on (it still runs)."""
    from processor.server import daemon as daemon_module

    diagnosed: list[bytes] = []
    real = daemon_module.undecodable_cause

    def counting(frame: bytes, **dialect: Any) -> str | None:
        diagnosed.append(frame)
        return real(frame, **dialect)

    monkeypatch.setattr(daemon_module, "undecodable_cause", counting)
    return diagnosed


def test_the_dialect_diagnosis_runs_only_while_its_line_would_be_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from processor import limits

    daemon = make_daemon(tmp_path, bad_messages_max=2, bad_links_per_address_max=0)
    binary = Codec(load_spec("binary")).encode(ECHO_FIELDS)
    diagnosed = counting_diagnoses(monkeypatch)
    transports = [FakeTransport() for _ in range(50)]

    def body() -> None:
        for transport in transports:  # one peer address, reconnecting after every close
            link = new_link(daemon)
            link.connection_made(transport)  # type: ignore[arg-type]
            link.data_received(FRAMER.frame(b"", binary) * 2)
            link.connection_lost(None)

    run(body)
    assert len(diagnosed) == limits.log_lines_per_kind_burst  # then no more decoding work
    assert all(transport.closed for transport in transports)  # by the cause, then the rate
    closed = daemon.metrics.links_closed
    assert closed.labels("network", "dialect_mismatch")._value.get() == len(diagnosed)
    assert closed.labels("network", "bad_message_rate")._value.get() == 50 - len(diagnosed)
    daemon.ledger.close()


def test_a_bad_first_message_in_the_right_dialect_keeps_the_link(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    response_mti = CODEC.encode(dict(ECHO_FIELDS, t="0810", **{"39": "00"}))
    # An 0100 whose PAN has 20 digits (field 2 holds at most 19): its STAN never parses.
    long_pan = auth_frame(3)[2:].replace(b"164761739001010085", b"2047617390010100851234", 1)
    bad_stan = CODEC.encode(dict(ECHO_FIELDS, **{"11": "00000A"}))

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", response_mti))  # a response MTI: not ours to answer
        link.data_received(FRAMER.frame(b"", bad_stan))
        link.data_received(FRAMER.frame(b"", long_pan))
        link.data_received(auth_frame(4))

    run(body)
    assert not transport.closed
    assert [(f["t"], f["11"], f["39"]) for f in transport.frames()] == [("0110", "000004", "00")]
    dropped = sum(
        daemon.metrics.bad_messages.labels("network", "undecodable", field)._value.get()
        for field in ("t", "11", "2")
    )
    assert dropped == 3
    closed = daemon.metrics.links_closed.labels("network", "dialect_mismatch")._value.get()
    assert closed == 0
    daemon.ledger.close()


def test_a_first_message_that_does_not_start_with_an_mti_closes_the_link(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(FRAMER.frame(b"", b"GET / HTTP/1.1\r\n\r\n"))

    run(body)
    assert transport.closed and transport.writes == []
    daemon.ledger.close()


def test_an_idle_link_is_closed_and_any_message_keeps_it_alive(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, idle_timeout_seconds=300.0)
    quiet, chatty = new_link(daemon), new_link(daemon)
    quiet_transport, chatty_transport = FakeTransport(), FakeTransport()

    def body() -> None:
        quiet.connection_made(quiet_transport)  # type: ignore[arg-type]
        chatty.connection_made(chatty_transport)  # type: ignore[arg-type]
        chatty.data_received(FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS)))

    run(body)
    assert chatty.last_received > quiet.last_received  # the echo test was seen
    # A round clock from here: with monotonic()'s value, (start + 300.0) - start may come out
    # as 299.99999999999994 and the link would not be idle yet. Both links on it: monotonic()
    # counts from boot, so a machine up for less than a quarter of an hour read below it.
    start = quiet.last_received = 1000.0
    chatty.last_received = start + 1.0
    assert daemon.close_stalled_links(start + 299.0) == 0
    chatty.last_received = start + 250.0  # an echo test 250 s in
    assert daemon.close_stalled_links(start + 300.0) == 1
    assert quiet_transport.closed and not chatty_transport.closed
    assert daemon.close_stalled_links(start + 549.0) == 0
    assert daemon.close_stalled_links(start + 550.0) == 1 and chatty_transport.closed
    closed = daemon.metrics.links_closed.labels("network", "idle_timeout")._value.get()
    assert closed == 2
    daemon.ledger.close()


def test_a_frame_left_half_sent_closes_the_link(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, partial_frame_timeout_seconds=30.0, idle_timeout_seconds=0)
    link, transport = new_link(daemon), FakeTransport()
    frame = auth_frame(5)

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(frame[:10])  # a frame begun...

    run(body)
    began = link.partial_since
    assert began is not None
    link.data_received(frame[10:20])  # ...dripped on: the frame still began then
    assert link.partial_since == began
    began = link.partial_since = 1000.0  # a round clock: see the idle test
    assert daemon.close_stalled_links(began + 29.9) == 0
    assert daemon.close_stalled_links(began + 30.0) == 1 and transport.closed
    closed = daemon.metrics.links_closed.labels("network", "partial_frame_timeout")._value.get()
    assert closed == 1
    daemon.ledger.close()


def test_a_completed_frame_clears_the_partial_frame_clock(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, idle_timeout_seconds=0)
    link, transport = new_link(daemon), FakeTransport()
    frame = FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS))

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(frame[:5])
        link.data_received(frame[5:])

    run(body)
    assert link.partial_since is None
    assert daemon.close_stalled_links(10_000.0) == 0  # neither timeout applies
    assert not transport.closed
    daemon.ledger.close()


def test_requests_past_the_decision_deadline_are_answered_91_and_advices_still_recorded(
    tmp_path: Path,
) -> None:
    import time

    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    late_ns = time.perf_counter_ns() - int(2 * 1e9)  # arrived 2 s ago: past the 1.5 s deadline
    stale = FRAMER.feed(auth_frame(1, amount=900))[0][1]
    advice_fields = {
        "t": "0120",
        "2": "4761739001010085",
        "3": "000000",
        "4": "000000000300",
        "7": "1124101010",
        "11": "000002",
        "18": "5411",
        "32": "123456",
        "49": "978",
    }
    advice = CODEC.encode(advice_fields)

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        for message in (stale, advice):  # as if they had waited behind an overloaded loop
            daemon.on_message(link, b"", message, late_ns)
        link.data_received(auth_frame(3, amount=500))  # a fresh one, decided as usual
        asyncio.get_running_loop().call_soon(daemon._flush)

    run(body)
    answers = {f["11"]: (f["t"], f["39"]) for f in transport.frames()}
    assert answers == {"000001": ("0110", "91"), "000002": ("0130", "00"), "000003": ("0110", "00")}
    assert link.in_flight == 0
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == 300 + 500  # the 91 applied nothing
    late = daemon.metrics.requests.labels("0100", "91", "issuer_deadline")._value.get()
    assert late == 1
    daemon.ledger.close()


class AddressedTransport(FakeTransport):
    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address

    def get_extra_info(self, name: str) -> object:
        return (self.address, 40000) if name == "peername" else None


def test_links_per_peer_address_are_limited(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, links_per_address_max=2)
    links = [new_link(daemon) for _ in range(4)]
    transports = [AddressedTransport(a) for a in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2")]
    for link, transport in zip(links, transports, strict=True):
        link.connection_made(transport)  # type: ignore[arg-type]
    assert [t.closed for t in transports] == [False, False, True, False]
    refused = daemon.metrics.links_closed.labels("network", "per_address_limit")._value.get()
    assert refused == 1
    links[2].connection_lost(None)  # the refused one goes away: counts nothing
    links[0].connection_lost(None)  # one of the address's links goes away: a slot frees
    again, transport = new_link(daemon), AddressedTransport("10.0.0.1")
    again.connection_made(transport)  # type: ignore[arg-type]
    assert not transport.closed
    assert len(daemon.links) == 3
    daemon.ledger.close()


def test_zero_length_frames_are_bad_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from processor import limits

    daemon = make_daemon(tmp_path, bad_messages_max=3)
    link, transport = new_link(daemon), FakeTransport()
    echo = FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS))

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        # First: not a dialect mismatch (nothing to diagnose), only a bad message.
        link.data_received(b"\x00\x00" + echo + b"\x00\x00")
        assert not transport.closed
        # The third closes the link; the echo behind it in the same read is not answered.
        link.data_received(b"\x00\x00" + echo)

    with caplog.at_level("WARNING", logger="processor.daemon"):
        run(body)
    assert transport.closed
    assert [f["t"] for f in transport.frames()] == ["0810"]
    zero = daemon.metrics.bad_messages.labels("network", "zero_length", "")._value.get()
    assert zero == 3
    closed = daemon.metrics.links_closed.labels("network", "bad_message_rate")._value.get()
    assert closed == 1
    assert daemon.metrics.links_closed.labels("network", "dialect_mismatch")._value.get() == 0
    lines = [r for r in caplog.records if "zero-length" in r.getMessage()]
    assert len(lines) == 3 <= limits.log_lines_per_kind_burst
    daemon.ledger.close()


def test_a_flood_of_zero_length_frames_logs_within_the_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from processor import limits

    daemon = make_daemon(tmp_path, bad_messages_max=100_000)
    link, transport = new_link(daemon), FakeTransport()

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        for _ in range(10):
            link.data_received(b"\x00\x00" * 1000)

    with caplog.at_level("WARNING", logger="processor.daemon"):
        run(body)
    assert not transport.closed and transport.writes == []
    lines = [r for r in caplog.records if "zero-length" in r.getMessage()]
    assert len(lines) == limits.log_lines_per_kind_burst
    suppressed = daemon.metrics.log_lines_suppressed.labels("zero_length")._value.get()
    assert suppressed == 10_000 - limits.log_lines_per_kind_burst
    zero = daemon.metrics.bad_messages.labels("network", "zero_length", "")._value.get()
    assert zero == 10_000
    daemon.ledger.close()


def network_frame(code: str, stan: int) -> bytes:
    fields = {"t": "0800", "7": "1124101010", "11": f"{stan:06d}", "70": code}
    return FRAMER.frame(b"", CODEC.encode(fields))


def advice_frame(stan: int, mti: str = "0120", amount: int = 300) -> bytes:
    fields = {
        "t": mti,
        "2": "4761739001010085",
        "3": "000000",
        "4": f"{amount:012d}",
        "7": "1124101010",
        "11": f"{stan:06d}",
        "18": "5411",
        "32": "123456",
        "49": "978",
    }
    return FRAMER.frame(b"", CODEC.encode(fields))


def test_a_listener_that_requires_sign_on_answers_91_until_the_link_signs_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = make_daemon(tmp_path, sign_on_required=True)
    link, transport = new_link(daemon), FakeTransport()
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None
        held_before = account.held

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(network_frame("301", 1))  # echo tests need no sign-on
        link.data_received(auth_frame(2, amount=500) + advice_frame(3))  # refused, both
        assert not daemon.pending  # never queued for a batch

    with caplog.at_level("WARNING", logger="processor.daemon"):
        run(body)
    answers = [(f["t"], f["11"], f["39"]) for f in transport.frames()]
    assert answers == [("0810", "000001", "00"), ("0110", "000002", "91"), ("0130", "000003", "91")]
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == held_before  # nothing applied
    refused = daemon.metrics.requests
    assert refused.labels("0100", "91", "not_signed_on")._value.get() == 1
    assert refused.labels("0120", "91", "not_signed_on")._value.get() == 1
    assert sum("before sign-on" in r.getMessage() for r in caplog.records) == 2
    assert not any("4761739001010085" in r.getMessage() for r in caplog.records)

    transport.writes.clear()

    def signed_on() -> None:
        link.data_received(network_frame("001", 4))
        # The network's repeat of the advice is recorded now; a new request is decided.
        link.data_received(advice_frame(3, mti="0121") + auth_frame(5, amount=500))

    run(signed_on)
    assert link.signed_on
    answers = [(f["t"], f["11"], f["39"]) for f in transport.frames()]
    assert answers == [("0810", "000004", "00"), ("0130", "000003", "00"), ("0110", "000005", "00")]
    with daemon.ledger.read() as reader:
        account = reader.account("demo-main")
        assert account is not None and account.held == held_before + 300 + 500

    transport.writes.clear()

    def signed_off() -> None:
        link.data_received(network_frame("002", 6))
        link.data_received(auth_frame(7, amount=500))

    run(signed_off)
    answers = [(f["t"], f["11"], f["39"]) for f in transport.frames()]
    assert answers == [("0810", "000006", "00"), ("0110", "000007", "91")]
    daemon.ledger.close()


def test_sign_on_is_per_link(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path, sign_on_required=True)
    first, second = new_link(daemon), new_link(daemon)
    first_transport, second_transport = FakeTransport(), FakeTransport()

    def body() -> None:
        first.connection_made(first_transport)  # type: ignore[arg-type]
        second.connection_made(second_transport)  # type: ignore[arg-type]
        first.data_received(network_frame("001", 1) + auth_frame(2))
        second.data_received(auth_frame(3))

    run(body)
    assert [(f["11"], f["39"]) for f in first_transport.frames()] == [
        ("000001", "00"),
        ("000002", "00"),
    ]
    assert [(f["11"], f["39"]) for f in second_transport.frames()] == [("000003", "91")]
    daemon.ledger.close()


# --- answers that do not fit, and what a peer can make the daemon log or compute ------------


def test_an_answer_longer_than_the_inbound_frame_limit_still_leaves(tmp_path: Path) -> None:
    """max_frame_bytes bounds what a peer may send; an approval adds fields 38 and 39 to what
    it echoes, so its answer is longer than a request that fitted, and it leaves all the same."""
    request = auth_frame(1)
    daemon = make_daemon(tmp_path, max_frame_bytes=len(request) - 2)  # the request fits exactly
    first, first_transport = new_link(daemon), FakeTransport("10.0.0.1")
    second, second_transport = new_link(daemon), FakeTransport("10.0.0.2")

    def body() -> None:
        first.connection_made(first_transport)  # type: ignore[arg-type]
        second.connection_made(second_transport)  # type: ignore[arg-type]
        first.data_received(request)
        second.data_received(auth_frame(2))

    run(body)
    answers = first_transport.frames() + second_transport.frames()
    assert [(answer["11"], answer["39"]) for answer in answers] == [
        ("000001", "00"),
        ("000002", "00"),
    ]
    assert len(first_transport.writes[0]) - 2 > len(request) - 2  # longer than the limit
    assert first.in_flight == second.in_flight == 0
    daemon.ledger.close()


def refusing_to_encode(monkeypatch: pytest.MonkeyPatch, stan: str) -> None:
    """Make the codec fail on the answer to STAN `stan` (as an answer no framing can carry
    would), and only on that one."""
    real = Codec.encode

    def encode(codec: Codec, fields: dict[str, str]) -> bytes:
        if fields.get("11") == stan and fields["t"] == "0110":  # the answer, not the request
            raise ValueError("cannot encode response field 2: too long")
        return real(codec, fields)

    monkeypatch.setattr(Codec, "encode", encode)


def test_an_answer_that_cannot_be_sent_costs_no_other_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = make_daemon(tmp_path)
    refusing_to_encode(monkeypatch, "000002")
    first, first_transport = new_link(daemon), FakeTransport("10.0.0.1")
    second, second_transport = new_link(daemon), FakeTransport("10.0.0.2")

    def body() -> None:
        first.connection_made(first_transport)  # type: ignore[arg-type]
        second.connection_made(second_transport)  # type: ignore[arg-type]
        first.data_received(auth_frame(1) + auth_frame(2) + auth_frame(3))
        second.data_received(auth_frame(4))

    run(body)
    assert [answer["11"] for answer in first_transport.frames()] == ["000001", "000003"]
    assert [answer["11"] for answer in second_transport.frames()] == ["000004"]
    assert first.in_flight == second.in_flight == 0 and daemon.pending == 0
    assert daemon.metrics.internal_errors._value.get() == 1
    daemon.ledger.close()


def test_a_late_answer_that_cannot_be_sent_leaves_the_daemon_deciding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 91 to a request that waited past the deadline, when it cannot be sent: the queue's
    count and the link's in-flight count stay true, and later requests are decided."""
    daemon = make_daemon(tmp_path)
    refusing_to_encode(monkeypatch, "000001")
    late, late_transport = new_link(daemon), FakeTransport("10.0.0.1")
    other, other_transport = new_link(daemon), FakeTransport("10.0.0.2")
    waited = time.perf_counter_ns() - int(2e9)  # past the 1.5 s deadline

    def body() -> None:
        late.connection_made(late_transport)  # type: ignore[arg-type]
        other.connection_made(other_transport)  # type: ignore[arg-type]
        daemon.on_message(late, b"", auth_frame(1)[2:], waited)
        daemon.on_message(late, b"", auth_frame(2)[2:], waited)

    run(body)
    assert [(a["11"], a["39"]) for a in late_transport.frames()] == [("000002", "91")]
    assert late.in_flight == 0 and daemon.pending == 0

    run(lambda: other.data_received(auth_frame(3) + auth_frame(4)))
    assert [(a["11"], a["39"]) for a in other_transport.frames()] == [
        ("000003", "00"),
        ("000004", "00"),
    ]
    daemon.ledger.close()


def test_signing_on_and_off_all_day_writes_a_bounded_number_of_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = make_daemon(tmp_path)
    link, transport = new_link(daemon), FakeTransport()
    caplog.set_level(logging.INFO, logger="processor.daemon")
    frames = b"".join(network_frame("001" if n % 2 else "002", n) for n in range(1, 2001))

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(frames)

    run(body, turns=50, until=lambda: len(transport.frames()) == 2000)
    assert len(transport.frames()) == 2000  # every one answered
    lines = [r.getMessage() for r in caplog.records if "sign-o" in r.getMessage()]
    assert len(lines) == 2 * limits.log_lines_per_kind_burst  # sign-on's and sign-off's
    suppressed = daemon.metrics.log_lines_suppressed
    assert suppressed.labels("sign_on")._value.get() == 1000 - limits.log_lines_per_kind_burst
    daemon.ledger.close()


def test_frames_no_dialect_explains_are_diagnosed_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first frame that starts like an MTI but decodes in no neighbouring dialect writes no
    dialect line; its diagnosis (hundreds of trial decodes) is budgeted all the same, or a
    peer staying under the bad-message rate on many links makes the daemon do it each time."""

    daemon = make_daemon(tmp_path)  # 20 bad messages a minute close a link
    diagnosed = counting_diagnoses(monkeypatch)
    links = [(new_link(daemon), FakeTransport("10.0.0.9")) for _ in range(10)]
    frame = FRAMER.frame(b"", b"0100" * 512)

    def body() -> None:
        for link, transport in links:
            link.connection_made(transport)  # type: ignore[arg-type]
            for _ in range(19):  # under the rate: the links stay open
                link.data_received(frame)

    run(body)
    assert all(not transport.closed for _, transport in links)
    assert len(diagnosed) == limits.log_lines_per_kind_burst
    daemon.ledger.close()


def test_a_link_closed_for_its_bad_messages_answers_what_it_queued_before(
    tmp_path: Path,
) -> None:
    """Closed at once, the link's 0100 queued before the bad messages was still decided and
    applied (a hold), and its approval dropped with the transport: the network timed out on
    an approval the issuer had recorded. It is answered now, then the link closes; what came
    after the last bad message in the same read is neither applied nor answered."""
    daemon = make_daemon(tmp_path, bad_messages_max=3)
    link, transport = new_link(daemon), FakeTransport()
    bad = FRAMER.frame(b"", CODEC.encode({"t": "0110", "11": "000009", "39": "00"}))

    def body() -> None:
        link.connection_made(transport)  # type: ignore[arg-type]
        link.data_received(auth_frame(1) + bad * 3 + auth_frame(2))

    run(body, until=lambda: transport.closed)
    assert transport.closed
    assert [(f["t"], f["11"], f["39"]) for f in transport.frames()] == [("0110", "000001", "00")]
    with daemon.ledger.read() as reader:
        assert reader.answer(b"0100|123456|000001|1124101010") is not None
        assert reader.answer(b"0100|123456|000002|1124101010") is None
    daemon.ledger.close()
