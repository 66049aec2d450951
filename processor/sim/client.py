"""A minimal network-side ISO 8583 client: frames requests, matches answers by STAN and checks
each answer against the wire contract (specs/messages.md), not only its field 39."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime

import iso8583

from processor.security import mask_card_numbers, mask_pan
from processor.types import Framing
from processor.wire.codec import AUTHORIZATION_ECHO, NETWORK_ECHO, Codec
from processor.wire.errors import FramingError
from processor.wire.framing import Framer
from processor.wire.responses import response_mti
from processor.wire.spec import load_spec

ANSWER_SECONDS = 5.0
APPROVED = ("00", "10")
# Requests whose approval is an authorisation or a purchase, and so carries an approval code.
_DECIDED = ("0100", "0101", "0200", "0201")


def transmission_datetime(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


class BadAnswer(Exception):
    """An answer that breaks the wire contract; the message says which request and what."""


class LinkDown(ConnectionError):
    """The link can answer nothing more (closed, reset, unframeable); the message says why."""


def _shown(key: str, value: str | None) -> str:
    if value is None:
        return "absent"
    return mask_pan(value) if key == "2" else repr(value)


def check_answer(
    request: dict[str, str], answer: dict[str, str], *, repeat: bool = False
) -> list[str]:
    """What in `answer` breaks the contract for `request`; empty when nothing does.

    The answer MTI is the daemon's own mapping; the echo set is the codec's (specs/messages.md:
    "Responses to financial-class messages echo ..."), with the two changes the spec allows: a
    partial approval (10) carries the approved amount in 4 (and 6), and a format error (30)
    leaves out the field at fault. 38 comes with an approval that holds or posts, and only then.
    """
    mti = request["t"]
    problems = []
    expected_mti = response_mti(mti)
    if answer.get("t") != expected_mti:
        problems.append(f"MTI {answer.get('t')}, expected {expected_mti}")
    code = answer.get("39")
    if code is None:
        problems.append("no field 39")
    # Converted here (the network's 51 not the account's): an approval, or an advice's
    # acknowledgement, carries what was held, in the account's currency, in 6 and 51 together.
    billing, billed = answer.get("6", ""), answer.get("51", "")
    converted = (
        mti in ("0100", "0101", "0120", "0121", "0200", "0201")
        and code == "00"
        and "51" in request
        and billed != request["51"]
        and len(billed) == 3
        and billed.isdigit()
        and billing.isdigit()
    )
    for key in NETWORK_ECHO if mti.startswith("08") else AUTHORIZATION_ECHO:
        if key not in request:
            continue
        sent, got = request[key], answer.get(key)
        if got == sent or (got is None and code == "30"):
            continue
        if key in ("6", "51") and converted:
            continue
        if key in ("12", "13") and repeat:
            continue  # a retransmission is replayed with the original's (they are not matched)
        if code == "10" and key in ("4", "6"):
            if got is not None and got.isdigit() and 0 < int(got) <= int(sent):
                continue
            problems.append(f"field {key} of a partial approval {_shown(key, got)}, asked {sent}")
            continue
        problems.append(f"field {key} not echoed: sent {_shown(key, sent)}, got {_shown(key, got)}")
    approval = answer.get("38")
    if mti in _DECIDED:
        # Every approval, a balance inquiry's too (DESIGN.md, wire contract).
        if code in APPROVED and (approval is None or len(approval) != 6):
            problems.append(f"39 = {code} without a 6-character approval code (38)")
        elif approval is not None and code not in APPROVED:
            problems.append(f"approval code (38) on a 39 = {code} answer")
    elif mti[:2] in ("04", "08") and approval is not None:
        problems.append(f"approval code (38) on an {answer.get('t')} answer")
    return problems


@dataclass
class _Awaited:
    request: dict[str, str]
    future: asyncio.Future[tuple[bytes, dict[str, str]]]


class WireClient:
    """One link. `exchange()` sends a message and waits for the answer with the same STAN.

    Whatever goes wrong on the link is reported at once rather than after a timeout: the end of
    the link (or an unframeable stream) fails every awaited answer and every later request with
    its cause, and an undecodable answer fails the requests in flight (it names no STAN, so it
    may be any of theirs). An answer nobody awaits, a second one included, is kept in
    `take_unsolicited()` and fails the next exchange.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: Framing):
        self._reader = reader
        self._writer = writer
        self.framer = Framer(prefix, max_frame_bytes=8192)
        self.codec = Codec(load_spec())
        self._spec = load_spec().iso
        self._waiting: dict[str, _Awaited] = {}
        self._answered: set[str] = set()  # STANs answered: a second answer is a duplicate
        self._timed_out: set[str] = set()
        self._unsolicited: list[str] = []
        self.failure: LinkDown | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, prefix: Framing = "len2") -> WireClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, prefix)

    async def _read(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    self._fail("link closed by the processor")
                    return
                try:
                    frames = self.framer.feed(data)
                except FramingError as error:
                    self._fail(f"answers cannot be framed any more: {error}")
                    return
                for _, message in frames:
                    if message:  # a zero-length frame is a keep-alive, not an answer
                        self._receive(message)
        except OSError as error:
            self._fail(f"link failed: {error.strerror or error}")

    def _fail(self, cause: str) -> None:
        self.failure = LinkDown(cause)
        for awaited in self._waiting.values():
            if not awaited.future.done():
                awaited.future.set_exception(LinkDown(cause))
        self._waiting.clear()

    def _receive(self, message: bytes) -> None:
        try:
            fields, _ = iso8583.decode(message, self._spec)
        except (iso8583.DecodeError, ValueError) as error:
            # The error may quote the bytes it choked on, which may hold a card number.
            problem = f"undecodable answer ({len(message)} bytes): {mask_card_numbers(str(error))}"
            if not self._waiting:
                self._unsolicited.append(problem)
            for in_flight in self._waiting.values():
                if not in_flight.future.done():
                    in_flight.future.set_exception(BadAnswer(problem))
            self._waiting.clear()
            return
        stan = fields.get("11", "")
        awaited = self._waiting.pop(stan, None)
        if awaited is None or awaited.future.done():
            if stan in self._answered:
                why = "a second answer"
            elif stan in self._timed_out:
                why = "a late answer (after its request timed out)"
            else:
                why = "an answer no request awaits"
            self._unsolicited.append(
                f"{why}: {fields.get('t')} STAN {stan or 'absent'} 39 = {fields.get('39')}"
            )
            return
        self._answered.add(stan)
        awaited.future.set_result((message, fields))

    def take_unsolicited(self) -> list[str]:
        """The answers (or undecodable frames) received that no request awaited, since last."""
        found, self._unsolicited = self._unsolicited, []
        return found

    def send_raw(self, message: bytes) -> None:
        self._writer.write(self.framer.frame(b"", message))

    def _raise_unsolicited(self) -> None:
        found = self.take_unsolicited()
        if found:
            raise BadAnswer("; ".join(found))

    async def exchange_raw(
        self, message: bytes, stan: str, timeout: float = ANSWER_SECONDS
    ) -> tuple[bytes, dict[str, str]]:
        """The answer to `message`, checked against it: BadAnswer when it breaks the contract,
        LinkDown when the link is gone, TimeoutError when nothing came within `timeout`."""
        if self.failure is not None:
            raise LinkDown(str(self.failure))
        self._raise_unsolicited()
        request, _ = iso8583.decode(message, self._spec)
        if stan in self._waiting:
            raise ValueError(f"STAN {stan} is already awaiting an answer on this link")
        future: asyncio.Future[tuple[bytes, dict[str, str]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[stan] = _Awaited(request, future)
        # A retransmission reuses its STAN: the answer it gets is not a duplicate.
        repeat = stan in self._answered or stan in self._timed_out or request["t"].endswith("1")
        self._answered.discard(stan)
        self._timed_out.discard(stan)
        self.send_raw(message)
        try:
            raw, answer = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self._waiting.pop(stan, None)
            self._timed_out.add(stan)
            raise TimeoutError(
                f"no answer to {request['t']} STAN {stan} within {timeout:g} s"
            ) from None
        problems = check_answer(request, answer, repeat=repeat)
        if problems:
            raise BadAnswer(f"{request['t']} STAN {stan}: {'; '.join(problems)}")
        self._raise_unsolicited()
        return raw, answer

    async def exchange(
        self, fields: dict[str, str], timeout: float = ANSWER_SECONDS
    ) -> tuple[bytes, dict[str, str]]:
        return await self.exchange_raw(self.codec.encode(fields), fields["11"], timeout)

    async def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
