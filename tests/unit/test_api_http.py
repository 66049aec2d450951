"""The control API's request parsing and its HTTP layer, in process on a real daemon object."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from processor.api.control import (
    ApiError,
    decode_cursor,
    encode_cursor,
    idempotency,
    is_json,
    validation_error,
)
from processor.api.http import build_app
from processor.api.views import Movement, NewAccount
from processor.config import Config, LedgerConfig
from processor.ledger.controls import Controls
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.security import PanHasher
from processor.server.daemon import Daemon

HASHER = PanHasher(b"unit-test-key")


def field_of(raw: bytes, of: type[Any]) -> str | None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(raw, type=of)
    error = validation_error(caught.value)
    assert (error.status, error.code) == (400, "invalid_body")
    return error.field


def test_validation_errors_name_the_field() -> None:
    assert field_of(b'{"amount": "1", "reason": "x"}', Movement) == "$.amount"
    assert field_of(b'{"amount": 1}', Movement) == "$.reason"
    assert field_of(b'{"amount": 1, "reason": "x", "extra": 1}', Movement) == "$.extra"
    assert field_of(b"[]", Movement) == "$"
    assert (
        field_of(b'{"currency": "EUR", "controls": {"amount_limits": [{}]}}', NewAccount)
        == "$.controls.amount_limits[0].interval"
    )
    assert field_of(b'{"channels": {"atm": false}}', Controls) == "$.channels.atm"
    assert field_of(b'{"count_limits": [{"count": 1}]}', Controls) == "$.count_limits[0]"


def test_validation_errors_never_echo_the_value() -> None:
    pan = "4761739001010010"
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.json.decode(json.dumps({"amount": pan, "reason": "x"}).encode(), type=Movement)
    assert pan not in validation_error(caught.value).message


def test_json_content_types() -> None:
    assert is_json("application/json")
    assert is_json("application/merge-patch+json")
    assert not is_json("text/plain")
    assert not is_json("application/octet-stream")  # what aiohttp reports for none at all


def test_idempotency_keys() -> None:
    def request(key: str | None, path: str = "/v1/accounts/a/fund") -> web.Request:
        headers = {} if key is None else {"Idempotency-Key": key}
        return make_mocked_request("POST", path, headers=headers)

    assert idempotency(request(None), b"{}", HASHER) is None
    first = idempotency(request("k-1"), b"{}", HASHER)
    assert first is not None and len(first.scope) == 32  # bounded, whatever the key's length
    assert first == idempotency(request("k-1"), b"{}", HASHER)
    assert first.scope != idempotency(request("k-1", "/v1/accounts/a/debit"), b"{}", HASHER).scope  # type: ignore[union-attr]
    assert first.body_digest != idempotency(request("k-1"), b"{ }", HASHER).body_digest  # type: ignore[union-attr]
    for bad in ("", "x" * 256, "caf\u00e9", "a\x7fb"):
        with pytest.raises(ApiError) as caught:
            idempotency(request(bad), b"{}", HASHER)
        assert caught.value.code == "invalid_idempotency_key"
    assert idempotency(request("~" * 255), b"{}", HASHER) is not None


def test_cursors_belong_to_their_listing() -> None:
    key = b"card_1\x00" + bytes(range(8)) + b"0100|1|000001|1124101010"
    cursor = encode_cursor(key)
    assert "=" not in cursor

    def query(text: str) -> web.Request:
        return make_mocked_request("GET", f"/x?cursor={text}")

    assert decode_cursor(query(cursor), b"card_1\x00") == key
    assert decode_cursor(make_mocked_request("GET", "/x"), b"card_1\x00") is None
    for bad in (cursor, "!!", "", "A" * 401):
        with pytest.raises(ApiError) as caught:
            decode_cursor(query(bad), b"card_2\x00")
        assert (caught.value.code, caught.value.field) == ("invalid_query", "cursor")


# --- the app in process --------------------------------------------------------------------------

Check = Callable[[TestClient[web.Request, web.Application]], Awaitable[None]]


def with_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str | None, check: Check
) -> None:
    """`token` None: the control API switched off (http.control_api = false)."""
    config = Config(ledger=LedgerConfig(path=str(tmp_path / "ledger"), durability="process"))
    ledger = Ledger(config.ledger.path, map_size_bytes=1 << 24, durability="process")
    daemon = Daemon(config, ledger, HASHER, Metrics())

    async def main() -> None:
        app = build_app(daemon, token, hasher=HASHER)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await check(client)

    try:
        asyncio.run(main())
    finally:
        ledger.close()


def test_switched_off_api_answers_503_but_health_stays_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def check(client: TestClient[web.Request, web.Application]) -> None:
        answer = await client.get("/v1/controls", headers={"Authorization": "Bearer x"})
        assert answer.status == 503
        assert (await answer.json())["error"]["code"] == "api_disabled"
        assert answer.headers["Cache-Control"] == "no-store"
        assert (await client.get("/healthz")).status == 200

    with_app(tmp_path, monkeypatch, None, check)


def test_token_errors_and_json_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        missing = await client.get("/v1/controls")
        assert missing.status == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await missing.json())["error"]["code"] == "unauthorized"
        for wrong_token in ("Bearer s3cre", "Bearer s3cret2", "Bearer ", "s3cret"):
            refused = await client.get("/v1/controls", headers={"Authorization": wrong_token})
            assert refused.status == 401, wrong_token
        ok = await client.get("/v1/controls", headers=bearer)
        assert ok.status == 200 and (await ok.json())["channels"]["chip"] is True
        created = await client.post("/v1/accounts", json={"currency": "EUR"}, headers=bearer)
        assert created.status == 201
        account_id = (await created.json())["id"]
        funded = await client.post(
            f"/v1/accounts/{account_id}/fund", json={"amount": 5, "reason": "x"}, headers=bearer
        )
        assert (await funded.json())["account"]["posted"] == 5
        wrong = await client.patch("/v1/controls", headers=bearer)
        assert wrong.status == 405 and "PUT" in wrong.headers["Allow"]
        assert (await wrong.json())["error"]["code"] == "method_not_allowed"
        big = await client.put(
            "/v1/controls",
            data=b'{"blocked_mccs": [' + b'"5411",' * 20_000 + b'"5411"]}',
            headers={**bearer, "Content-Type": "application/json"},
        )
        assert big.status == 413 and (await big.json())["error"]["code"] == "body_too_large"
        html = await client.get("/nowhere")
        assert html.content_type == "application/json" and html.status == 404

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_ledger_failure_is_503_and_applies_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        created = await client.post("/v1/accounts", json={"currency": "EUR"}, headers=bearer)
        account_id = (await created.json())["id"]

        def full(writer: Any, now_ms: int) -> object:
            raise lmdb.MapFullError("mdb_put: MDB_MAP_FULL")

        # The daemon's own path for an operating error: the batch is aborted and the error
        # raised from execute().
        from processor.api import commands

        monkeypatch.setattr(commands, "move_funds", lambda *args: full)
        funded = await client.post(
            f"/v1/accounts/{account_id}/fund", json={"amount": 5, "reason": "x"}, headers=bearer
        )
        assert funded.status == 503 and funded.headers["Retry-After"] == "1"
        assert (await funded.json())["error"]["code"] == "ledger_unavailable"
        shown = await client.get(f"/v1/accounts/{account_id}", headers=bearer)
        assert (await shown.json())["posted"] == 0

    with_app(tmp_path, monkeypatch, "s3cret", check)
