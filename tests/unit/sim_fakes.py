"""Peers for the simulator's tests (no tests here): a small issuer on a real socket that keeps
a balance and replays answers as the daemon does, or misbehaves as told, and a control API."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import Any

import iso8583
from aiohttp import web

from processor.wire.codec import AUTHORIZATION_ECHO, NETWORK_ECHO
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

SPEC = load_spec().iso


def frame(message: bytes) -> bytes:
    return struct.pack(">H", len(message)) + message


def encode(fields: dict[str, str]) -> bytes:
    out, _ = iso8583.encode(dict(fields), SPEC)
    return bytes(out)


@dataclass
class FakeIssuer:
    """Answers 0800, 0100/0101 and 0400 as specs/messages.md says, unless told otherwise.

    stateless: a retransmission is approved again (a new hold) instead of replayed.
    close_at / hang_at: the n-th request (from 1, over all links) closes its link / is never
    answered. release: requests from the held_from-th on are answered once it is set.
    duplicate: every answer twice. garbage: every answer undecodable. silent: nothing answered.
    """

    available: int = 1_000_000
    stateless: bool = False
    close_at: int | None = None
    hang_at: int | None = None
    duplicate: bool = False
    garbage: bool = False
    silent: bool = False
    frozen: set[str] = field(default_factory=set)
    requests: list[dict[str, str]] = field(default_factory=list)
    links: int = 0
    release: asyncio.Event | None = None
    held_from: int = 2
    _answers: dict[tuple[str, ...], tuple[dict[str, str], bytes]] = field(default_factory=dict)
    _holds: dict[tuple[str, ...], int] = field(default_factory=dict)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        self._server.close()
        for writer in self._writers:  # a link whose handler has not run its end yet
            writer.close()
        await self._server.wait_closed()

    def reversed_stans(self) -> list[str]:
        return [r["90"][4:10] for r in self.requests if r["t"] == "0400"]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.links += 1
        self._writers.append(writer)
        framer = Framer("len2", max_frame_bytes=8192)
        try:
            while data := await reader.read(65536):
                for _, message in framer.feed(data):
                    fields, _ = iso8583.decode(message, SPEC)
                    request = {k: v for k, v in fields.items() if k not in ("p", "1")}
                    self.requests.append(request)
                    number = len(self.requests)
                    if number == self.close_at:
                        writer.close()
                        return
                    if number == self.hang_at or self.silent:
                        continue
                    if self.release is not None and number >= self.held_from:
                        await self.release.wait()
                    answer = b"0110\xff\xffgarbage" if self.garbage else self.answer(request)
                    writer.write(frame(answer) * (2 if self.duplicate else 1))
        except ConnectionError:
            pass
        finally:
            writer.close()

    def answer(self, request: dict[str, str]) -> bytes:
        mti = request["t"]
        keys = NETWORK_ECHO if mti.startswith("08") else AUTHORIZATION_ECHO
        reply = {k: request[k] for k in keys if k in request}
        reply["t"] = f"{mti[:2]}{int(mti[2]) + 1}0"
        if mti == "0800":
            reply["39"] = "00"
            return encode(reply)
        identity = (mti[:3], str(int(request["32"])), request["11"], request["7"])
        if mti == "0400":
            original = request["90"]
            key = (original[:3], str(int(original[20:31])), original[4:10], original[10:20])
            reply["39"] = "00" if key in self._answers else "25"
            self.available += self._holds.pop(key, 0)
            return encode(reply)
        content = {k: v for k, v in request.items() if k != "t"}
        if identity in self._answers and not self.stateless:
            stored, raw = self._answers[identity]
            if stored == content:
                return raw
            reply["39"] = "94"
            return encode(reply)
        amount = int(request.get("4", "0"))
        if request["3"].startswith("31"):
            reply["39"] = "00"
            reply["54"] = f"0001978C{self.available:012d}0002978C{self.available:012d}"
            reply["38"] = f"B{request['11'][-5:]}"
        elif request["2"] in self.frozen:
            reply["39"] = "62"
        elif amount > self.available:
            reply["39"] = "51"
        else:
            self.available -= amount
            self._holds[identity] = self._holds.get(identity, 0) + amount
            reply["39"] = "00"
            reply["38"] = f"A{request['11'][-5:]}"
        raw = encode(reply)
        self._answers[identity] = (content, raw)
        return raw


@dataclass
class FakeApi:
    """The control API calls freeze_then_swipe makes. Forgets idempotency keys, as retention
    does after days: a registration replayed by key gets 409 card_exists here."""

    issuer: FakeIssuer
    cards: dict[str, str] = field(default_factory=dict)  # card id -> PAN

    async def start(self) -> tuple[str, web.AppRunner]:
        app = web.Application()
        app.router.add_post("/v1/accounts", self._account)
        app.router.add_post("/v1/accounts/{id}/fund", self._ok)
        app.router.add_post("/v1/cards", self._card)
        app.router.add_post("/v1/cards/{id}/freeze", self._freeze)
        app.router.add_post("/v1/cards/{id}/unfreeze", self._unfreeze)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}", runner

    async def _account(self, request: web.Request) -> web.Response:
        return web.json_response({"id": (await request.json())["id"]}, status=201)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _card(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        if body["pan"] in self.cards.values():
            error = {"code": "card_exists", "message": "a card with this number is registered"}
            return web.json_response({"error": error}, status=409)
        card_id = f"card_{len(self.cards)}"
        self.cards[card_id] = body["pan"]
        return web.json_response({"id": card_id}, status=201)

    async def _freeze(self, request: web.Request) -> web.Response:
        self.issuer.frozen.add(self.cards[request.match_info["id"]])
        return web.json_response({})

    async def _unfreeze(self, request: web.Request) -> web.Response:
        self.issuer.frozen.discard(self.cards[request.match_info["id"]])
        return web.json_response({})
