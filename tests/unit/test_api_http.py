"""The control API's request parsing and its HTTP layer, in process on a real daemon object."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
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
from processor.api.http import DAEMON_KEY, build_app
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
    # The key alone is the scope; the method, path and body are what must match.
    elsewhere = idempotency(request("k-1", "/v1/accounts/a/debit"), b"{}", HASHER)
    assert elsewhere is not None and elsewhere.scope == first.scope
    assert elsewhere.body_digest != first.body_digest
    assert first.body_digest != idempotency(request("k-1"), b"{ }", HASHER).body_digest  # type: ignore[union-attr]
    # Records stored when the scope was method + path + key are still found under it.
    assert first.legacy_scope is not None and first.legacy_scope != elsewhere.legacy_scope
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


@pytest.mark.parametrize(
    ("failure", "code", "retry_after"),
    [
        (lmdb.DiskError("mdb_txn_commit: EIO"), "ledger_unavailable", "1"),
        # The map cannot grow (these tests' ledgers have no ceiling above their size).
        (lmdb.MapFullError("mdb_put: MDB_MAP_FULL"), "ledger_full", "60"),
    ],
)
def test_a_ledger_failure_is_503_and_applies_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: lmdb.Error,
    code: str,
    retry_after: str,
) -> None:
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        created = await client.post("/v1/accounts", json={"currency": "EUR"}, headers=bearer)
        account_id = (await created.json())["id"]

        def full(writer: Any, now_ms: int) -> object:
            raise failure

        # The daemon's own path for an operating error: the batch is aborted and the error
        # raised from execute().
        from processor.api import commands

        monkeypatch.setattr(commands, "move_funds", lambda *args: full)
        funded = await client.post(
            f"/v1/accounts/{account_id}/fund", json={"amount": 5, "reason": "x"}, headers=bearer
        )
        assert funded.status == 503 and funded.headers["Retry-After"] == retry_after
        assert (await funded.json())["error"]["code"] == code
        shown = await client.get(f"/v1/accounts/{account_id}", headers=bearer)
        assert (await shown.json())["posted"] == 0

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_card_records_older_shorthands_show_among_its_controls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Card records from before card controls still carry a per-transaction limit and blocked
    MCCs, which the engine enforces (61, 57); the card and its controls showed none of them,
    so the programme could not see why its authorisations were declined."""
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        ledger = client.server.app[DAEMON_KEY].ledger
        await client.post("/v1/accounts", json={"currency": "JPY", "id": "old"}, headers=bearer)
        registered = await client.post(
            "/v1/cards",
            json={"pan": "4761730000000003", "expiry": "3012", "account_id": "old"},
            headers=bearer,
        )
        card_id = (await registered.json())["id"]
        with ledger.write() as writer:  # as a record written before card controls
            found = writer.card_by_id(card_id)
            assert found is not None
            key, card = found
            older = msgspec.structs.replace(card, per_transaction_limit=100, blocked_mccs=("7995",))
            writer.put_card(key, older, card.account_id)
        for path in (f"/v1/cards/{card_id}/controls", f"/v1/cards/{card_id}"):
            answer = await client.get(path, headers=bearer)
            body = await answer.json()
            controls = body.get("controls", body)
            assert controls["blocked_mccs"] == ["7995"], path
            [limit] = controls["amount_limits"]
            assert limit["interval"] == "per_authorization" and limit["categories"] == []
            assert (limit["amount"], limit["currency"]) == (100, "JPY")
        frozen = await client.post(f"/v1/cards/{card_id}/freeze", headers=bearer)
        assert (await frozen.json())["controls"]["blocked_mccs"] == ["7995"]

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_an_account_id_of_dots_alone_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `.` and `..` were accepted (201), and then every client removed them from the path
    # (RFC 3986): /v1/accounts/. became /v1/accounts/, the account out of reach for good.
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        for refused in (".", "..", "..."):
            answer = await client.post(
                "/v1/accounts", json={"currency": "EUR", "id": refused}, headers=bearer
            )
            assert answer.status == 400, refused
            assert (await answer.json())["error"]["field"] == "$.id", refused
        kept = await client.post(
            "/v1/accounts", json={"currency": "EUR", "id": ".a."}, headers=bearer
        )
        assert kept.status == 201

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_cards_number_in_an_account_id_or_a_reason_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both are kept and shown in clear (views, entries, events, the ledger's keys): a card's
    # number typed into one was stored and answered back as it was.
    bearer = {"Authorization": "Bearer s3cret"}
    pan = "4761739001010010"

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        made = await client.post(
            "/v1/accounts", json={"currency": "EUR", "id": "a1-20261207"}, headers=bearer
        )
        assert made.status == 201
        registered = await client.post(
            "/v1/cards",
            json={"pan": pan, "expiry": "3012", "account_id": "a1-20261207"},
            headers=bearer,
        )
        assert registered.status == 201
        typed = (pan, f"acct-{pan}", "acct-4761-7390-0101-0010", "4761.7390.0101.0010")
        beside = (
            "acct-2024-4761739001010010",
            "4761739001010010-2",
            "acct:2024:4761:7390:0101:0010",
        )
        for account_id in (*typed, *beside, "acct:4761:7390:0101:0010", "4761_7390_0101_0010"):
            answer = await client.post(
                "/v1/accounts", json={"currency": "EUR", "id": account_id}, headers=bearer
            )
            assert answer.status == 400, account_id
            text = await answer.text()
            assert pan not in text and "0101" not in text, text
            assert (await answer.json())["error"]["field"] == "$.id"
        # A customer number that passes the Luhn check (a tenth of all numbers do) is no card.
        customer = await client.post(
            "/v1/accounts", json={"currency": "EUR", "id": "cust-4000056655665556"}, headers=bearer
        )
        assert customer.status == 201
        refused = await client.post(
            "/v1/accounts/a1-20261207/fund",
            json={"amount": 5, "reason": "order 12: refund 3 4761 7390 0101 0010 05/27"},
            headers=bearer,
        )
        assert refused.status == 400 and "0101" not in await refused.text()
        assert (await refused.json())["error"]["field"] == "$.reason"
        entries = await client.get("/v1/accounts/a1-20261207/entries", headers=bearer)
        assert (await entries.json())["items"] == []  # nothing moved
        moved = await client.post(
            "/v1/accounts/a1-20261207/fund",
            json={"amount": 5, "reason": "refund of order 4000056655665556"},
            headers=bearer,
        )
        assert moved.status == 200

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_personal_data_that_no_person_has_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A birth date in the future or before 1900 and control characters in a name or an
    address were stored (201), for KYC and the card bureau's labels to carry on with; and a
    virtual card's replacement took a shipping address it never used."""
    from processor.personal_data import PersonalDataCipher

    bearer = {"Authorization": "Bearer s3cret"}
    address = {"line1": "Kastanienallee 12", "city": "Berlin", "postal_code": "10435"}
    person = {
        "type": "individual",
        "name": "Ada Quietwater",
        "date_of_birth": "1985-12-10",
        "address": {**address, "country": "DE"},
    }

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        client.server.app[DAEMON_KEY].personal_data = PersonalDataCipher([bytes(range(32))])
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
        refused = {
            "$.details.date_of_birth": [
                {**person, "date_of_birth": tomorrow},
                {**person, "date_of_birth": "1899-12-31"},
            ],
            "$.details.name": [{**person, "name": "Ada\u0000"}, {**person, "name": "A\nB"}],
            "$.details.email": [{**person, "email": "ada\u001b[2J@example.org"}],
            "$.details.address.line1": [
                {**person, "address": {**person["address"], "line1": "12\u0085"}}  # type: ignore[dict-item]
            ],
        }
        for field, bodies in refused.items():
            for body in bodies:
                answer = await client.post(
                    "/v1/cardholders", json={"details": body}, headers=bearer
                )
                assert answer.status == 400, body
                assert (await answer.json())["error"]["field"] == field, body
        made = await client.post(
            "/v1/cardholders",
            json={"details": {**person, "name": "Zoë O'Brien-Łukasiewicz 中"}},
            headers=bearer,
        )
        assert made.status == 201, await made.text()
        holder = (await made.json())["id"]
        kyc = await client.post(
            f"/v1/cardholders/{holder}/kyc", json={"status": "approved"}, headers=bearer
        )
        assert kyc.status == 200
        opened = await client.post(
            "/v1/accounts", json={"currency": "EUR", "cardholder_id": holder}, headers=bearer
        )
        account_id = (await opened.json())["id"]
        issued = await client.post(
            "/v1/cards/virtual", json={"account_id": account_id}, headers=bearer
        )
        card_id = (await issued.json())["id"]
        replaced = await client.post(
            f"/v1/cards/{card_id}/replace",
            json={"reason": "damaged", "shipping_address": {**address, "country": "DE"}},
            headers=bearer,
        )
        assert replaced.status == 400
        assert (await replaced.json())["error"]["field"] == "$.shipping_address"

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_bound_in_an_error_is_stated_not_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 10^15 is Luhn-valid: "Expected `int` <= 100000******0000" hid the limit it was about.
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        await client.post("/v1/accounts", json={"currency": "EUR", "id": "a1"}, headers=bearer)
        answer = await client.post(
            "/v1/accounts/a1/fund", json={"amount": 10**15 + 1, "reason": "x"}, headers=bearer
        )
        error = (await answer.json())["error"]
        assert (answer.status, error["field"]) == (400, "$.amount")
        assert error["message"] == "Expected `int` <= 1_000_000_000_000_000 - at `$.amount`"

    with_app(tmp_path, monkeypatch, "s3cret", check)


# --- requests aiohttp's parser refuses ---------------------------------------------------------


def test_malformed_requests_get_a_status_that_says_what_was_wrong() -> None:
    from aiohttp.http_exceptions import (
        BadHttpMessage,
        BadHttpMethod,
        BadStatusLine,
        InvalidHeader,
        InvalidURLError,
        LineTooLong,
    )

    from processor.api.http import malformed_request_answer

    def status(exc: BaseException) -> tuple[int, str]:
        return malformed_request_answer(exc)[:2]

    # The C parser hands a bytearray of the line's first 100 bytes; the Python one bytes.
    assert status(LineTooLong(bytearray(b"/" + b"a" * 99) + b"...", 8190)) == (414, "uri_too_long")
    assert status(LineTooLong(b"GET /aaaa...", 8190)) == (414, "uri_too_long")
    assert status(LineTooLong(b"http://host/a...", 8190)) == (414, "uri_too_long")
    header = (431, "header_fields_too_large")
    assert status(LineTooLong(bytearray(b"Bearer tok_SSSS..."), 8190)) == header
    assert status(LineTooLong(b"X-Long...", 8190)) == header
    assert status(BadHttpMessage("Too many headers received")) == header
    assert status(BadStatusLine("HTTP/9.9")) == (400, "bad_request")
    assert status(BadHttpMethod("G(T")) == (400, "bad_request")
    assert status(InvalidURLError("bad")) == (400, "bad_request")
    assert status(InvalidHeader(b"X: \x01")) == (400, "bad_request")
    assert status(BadHttpMessage("Invalid header value char")) == (400, "bad_request")


def raw_http(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh connection; what came back until the server closed it."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        for _ in range(100):  # bounded: the answer is small and the server closes
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


async def over_side_port(
    daemon: Daemon, token: str, requests: dict[str, bytes]
) -> dict[str, bytes]:
    """Each raw request's raw answer from the side port as the daemon serves it (its own
    request handler, not the test server's)."""
    from processor.api.http import start_http
    from processor.server.daemon import accept_http, listen

    sock = listen("127.0.0.1", 0, name="HTTP")
    bound = sock.getsockname()[1]
    port = await start_http(accept_http(daemon, sock), daemon, token)
    loop = asyncio.get_running_loop()
    answers: dict[str, bytes] = {}
    try:
        for name, data in requests.items():
            answers[name] = await loop.run_in_executor(None, raw_http, bound, data)
    finally:
        await port.cleanup()
    return answers


def test_malformed_requests_are_answered_in_json_logged_once_and_echo_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = Config(ledger=LedgerConfig(path=str(tmp_path / "ledger"), durability="process"))
    ledger = Ledger(config.ledger.path, map_size_bytes=1 << 24, durability="process")
    daemon = Daemon(config, ledger, HASHER, Metrics())
    token = "tok_" + "S" * 9000  # a header line over 8 KB
    requests = {
        "oversized": b"GET /v1/accounts HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\n\r\n",
        "control": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Secret: ab\x01cd-SECRETVALUE\r\n\r\n",
        "request_line": b"G(T /SECRETVALUE HTTP/1.1\r\nHost: x\r\n\r\n",
        "healthy": b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    }
    with caplog.at_level("DEBUG"):
        try:
            answers = asyncio.run(over_side_port(daemon, "s3cret-token-of-16+", requests))
        finally:
            ledger.close()
    expected = {
        "oversized": (b"431", "header_fields_too_large"),
        "control": (b"400", "bad_request"),
        "request_line": (b"400", "bad_request"),
    }
    for name, (status, code) in expected.items():
        head, _, body = answers[name].partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, name
        assert b"Content-Type: application/json" in head, name
        assert json.loads(body)["error"]["code"] == code, name
        assert b"SSSS" not in answers[name] and b"SECRET" not in answers[name], name
    assert answers["healthy"].startswith(b"HTTP/1.1 200")
    lines = [r for r in caplog.records if r.name.startswith(("processor", "aiohttp"))]
    assert len(lines) == 3  # one each, no more
    assert all(r.exc_info is None and r.levelname == "WARNING" for r in lines)
    assert not any("SSSS" in r.getMessage() or "SECRET" in r.getMessage() for r in lines)


def test_an_unknown_expectation_is_refused_in_the_api_format_quoting_nothing(
    tmp_path: Path,
) -> None:
    """aiohttp refuses an Expect other than 100-continue before any middleware: its text/plain
    417 quoted the header back (a card number in it too), to a client that showed no token."""
    config = Config(ledger=LedgerConfig(path=str(tmp_path / "ledger"), durability="process"))
    ledger = Ledger(config.ledger.path, map_size_bytes=1 << 24, durability="process")
    daemon = Daemon(config, ledger, HASHER, Metrics())
    expect = b"Expect: 4761739001010010-SECRETVALUE\r\n"
    requests = {
        "control": b"POST /v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        + expect
        + b"Connection: close\r\n\r\n{}",
        "unknown": b"GET /nowhere HTTP/1.1\r\nHost: x\r\n" + expect + b"Connection: close\r\n\r\n",
    }
    try:
        answers = asyncio.run(over_side_port(daemon, "s3cret-token-of-16+", requests))
    finally:
        ledger.close()
    for name, answer in answers.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"417", name
        assert b"Content-Type: application/json" in head, name
        # Read as a keep-alive client reads it: by its Content-Length (aiohttp's text set it).
        [length] = re.findall(rb"Content-Length: (\d+)", head)
        assert json.loads(body[: int(length)])["error"]["code"] == "expectation_failed", name
        assert len(body) == int(length), name
        assert b"SECRET" not in answer and b"4761739001010010" not in answer, name
    assert b"Cache-Control: no-store" in answers["control"]


def test_a_flood_of_malformed_requests_writes_a_bounded_number_of_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from aiohttp.http_exceptions import InvalidHeader

    from processor import limits
    from processor.api.http import MalformedRequestLog

    metrics = Metrics()
    malformed = MalformedRequestLog(metrics)
    with caplog.at_level("WARNING", logger="processor.api"):
        for _ in range(1000):
            malformed.write("127.0.0.1", 400, "bad_request", InvalidHeader(b"X: \x01"))
    assert len(caplog.records) == limits.log_lines_per_kind_burst
    suppressed = metrics.log_lines_suppressed.labels("http_bad_request")._value.get()
    assert suppressed == 1000 - limits.log_lines_per_kind_burst


def test_a_body_that_does_not_decode_or_a_forged_cursor_is_a_400_not_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        created = await client.post("/v1/accounts", json={"currency": "EUR"}, headers=bearer)
        account_id = (await created.json())["id"]
        # A cursor of the entries' own form whose sequence does not fit their u64 keys.
        page_key = b"e:" + account_id.encode() + b"\x00" + b"18446744073709551616"
        forged = base64.urlsafe_b64encode(page_key).decode().rstrip("=")
        paged = await client.get(
            f"/v1/accounts/{account_id}/entries?cursor={forged}", headers=bearer
        )
        assert paged.status == 400 and (await paged.json())["error"]["field"] == "cursor"
        # Another account's cursor is not a position in this one's entries (it was read as one).
        other = await client.post("/v1/accounts", json={"currency": "EUR"}, headers=bearer)
        other_id = (await other.json())["id"]
        for owner in (account_id, other_id):
            for amount in (1, 2, 3):
                funded = await client.post(
                    f"/v1/accounts/{owner}/fund",
                    json={"amount": amount, "reason": "test"},
                    headers=bearer,
                )
                assert funded.status == 200
        first = await client.get(f"/v1/accounts/{account_id}/entries?limit=1", headers=bearer)
        cursor = (await first.json())["next_cursor"]
        own = await client.get(f"/v1/accounts/{account_id}/entries?cursor={cursor}", headers=bearer)
        assert [item["amount"] for item in (await own.json())["items"]] == [2, 1]
        crossed = await client.get(
            f"/v1/accounts/{other_id}/entries?cursor={cursor}", headers=bearer
        )
        assert crossed.status == 400 and (await crossed.json())["error"]["field"] == "cursor"
        # A corrupt gzip body: a 400 (aiohttp's parser then closes the connection), or the
        # connection closed first; never a 500 with a traceback.
        try:
            corrupt = await client.post(
                f"/v1/accounts/{account_id}/fund",
                data=b"xxxxx",
                headers={**bearer, "Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        except aiohttp.ServerDisconnectedError:
            pass
        else:
            assert corrupt.status == 400
            assert (await corrupt.json())["error"]["field"] == "Content-Encoding"

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_card_number_sent_anywhere_never_comes_back_in_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bearer = {"Authorization": "Bearer s3cret"}
    pan = "4761731696953232"  # passes the Luhn check

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        answers = [
            await client.put(
                "/v1/controls",
                json={"amount_limits": [{"interval": pan, "amount": 100}]},
                headers=bearer,
            ),
            await client.get(f"/v1/cards/{pan}", headers=bearer),
            # Named in the error's `field` too, which was not masked.
            await client.post("/v1/accounts", json={"currency": "EUR", pan: "x"}, headers=bearer),
            await client.get(f"/v1/controls?{pan}=1", headers=bearer),
        ]
        for answer in answers:
            text = await answer.text()
            assert answer.status in (400, 404), text
            assert pan not in text and "476173******3232" in text, text
        # Grouped, or followed by its expiry: masked all the same (they came back in clear).
        grouped = " ".join(pan[i : i + 4] for i in range(0, 16, 4))
        for sent, masked in (
            (grouped.replace(" ", "%20"), "4761 73** **** 3232"),
            (grouped.replace(" ", "-"), "4761-73**-****-3232"),
            (pan + "3012", "476173**********3012"),
        ):
            answer = await client.get(f"/v1/accounts/{sent}", headers=bearer)
            text = await answer.text()
            assert answer.status == 404, text
            assert pan[6:12] not in text and masked in text, text

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_corrupt_compressed_body_logs_no_traceback_with_or_without_a_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The side port as the daemon serves it: aiohttp read on a body the handler left unread
    (an unauthenticated POST), and a corrupt gzip stream logged its "Unhandled exception"
    traceback per request, before any token was checked: a way to fill the log."""
    config = Config(ledger=LedgerConfig(path=str(tmp_path / "ledger"), durability="process"))
    ledger = Ledger(config.ledger.path, map_size_bytes=1 << 24, durability="process")
    daemon = Daemon(config, ledger, HASHER, Metrics())
    token = "s3cret-token-of-16+"
    corrupt = (
        b"POST /v1/accounts/a/fund HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: 5\r\nConnection: close\r\n"
    )
    requests = {
        "no token": corrupt + b"\r\nxxxxx",
        "token": corrupt + b"Authorization: Bearer " + token.encode() + b"\r\n\r\nxxxxx",
    }
    try:
        answers = asyncio.run(over_side_port(daemon, token, requests))
    finally:
        ledger.close()
    assert answers["no token"].startswith(b"HTTP/1.1 401")
    assert answers["token"].startswith(b"HTTP/1.1 400") or answers["token"] == b""
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_card_details_refusals_count_an_ipv6_host_by_its_slash_64() -> None:
    from processor.api.reveal import client_of

    assert (
        client_of("2001:db8:1:2:aaaa::1")
        == client_of("2001:db8:1:2:bbbb::2")
        == ("2001:db8:1:2::/64")
    )
    assert client_of("2001:db8:1:3::1") != client_of("2001:db8:1:2::1")
    assert client_of("192.0.2.7") == "192.0.2.7"
    assert client_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_of(None) == "unknown"


def test_readyz_is_503_while_a_workers_batches_fail(tmp_path: Path) -> None:
    """Each process knew only its own batches: with the disk full, links a worker had
    accepted were answered 96 to everything while /readyz said ready (40 of 40, in a
    review's run). A worker's failing batches reach the primary in its reports."""
    from processor.authorizer import Outcome

    config = Config(ledger=LedgerConfig(path=str(tmp_path / "ledger"), durability="process"))
    ledger = Ledger(config.ledger.path, map_size_bytes=1 << 24, durability="process")
    daemon = Daemon(config, ledger, HASHER, Metrics())
    gauge = "processor_ledger_writes_failing"

    def worker_reports(value: float) -> None:
        daemon.metrics.workers.update(2, [(gauge, gauge, (), value)])

    async def main() -> list[tuple[int, dict[str, object]]]:
        seen = []
        app = build_app(daemon, None, hasher=HASHER)
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            for value in (None, 1.0, 0.0):
                if value is not None:
                    worker_reports(value)
                answer = await client.get("/readyz")
                seen.append((answer.status, await answer.json()))
        return seen

    try:
        assert asyncio.run(main()) == [
            (200, {"ready": True}),
            (503, {"ready": False, "reason": "ledger_error_in_workers", "workers": 1}),
            (200, {"ready": True}),
        ]
        # What a worker reports: its own last batch's failure, as the gauge.
        failed = Outcome({}, "0100", "96", "ledger_error:DiskError")
        daemon._ledger_errors([failed])
        assert daemon.metrics.ledger_writes_failing._value.get() == 1
        daemon._ledger_errors([Outcome({}, "0100", "00", "approved")])
        assert daemon.metrics.ledger_writes_failing._value.get() == 0
    finally:
        ledger.close()


def test_a_card_number_grouped_by_dots_slashes_or_underscores_is_masked_in_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Masking knew spaces and dashes only: `GET /v1/accounts/4761.7390.0101.0010` answered
    "no account '4761.7390.0101.0010'", and the same number came back whole as an unknown
    query parameter or an enum value. Bounds written in thousands stay as they are."""
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        for written in ("4761.7390.0101.0010", "4761_7390_0101_0010", "4761:7390:0101:0010"):
            shown = written[:7] + "**" + written[9] + "****" + written[14:]
            missing = await client.get(f"/v1/accounts/{written}", headers=bearer)
            assert missing.status == 404
            assert shown in (await missing.text()) and written not in (await missing.text())
            await client.post("/v1/accounts", json={"currency": "EUR", "id": "a1"}, headers=bearer)
            odd = await client.get(f"/v1/accounts/a1/entries?{written}=1", headers=bearer)
            error = (await odd.json())["error"]
            assert (odd.status, error["field"]) == (400, shown)
        nowhere = await client.get("/v1/nothing/4761%2F7390%2F0101%2F0010", headers=bearer)
        assert "4761/73**/****/0010" in (await nowhere.json())["error"]["message"]

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_movement_reason_with_control_characters_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NUL or an escape sequence went on into the account's entries, and on into whatever
    prints them; personal data and ids refused them already."""
    bearer = {"Authorization": "Bearer s3cret"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        await client.post("/v1/accounts", json={"currency": "EUR", "id": "a1"}, headers=bearer)
        for reason in ("a\u0000b", "top-up\u001b[2J", "line\nbreak"):
            answer = await client.post(
                "/v1/accounts/a1/fund", json={"amount": 1, "reason": reason}, headers=bearer
            )
            error = (await answer.json())["error"]
            assert (answer.status, error["field"]) == (400, "$.reason"), reason
        fine = await client.post(
            "/v1/accounts/a1/fund", json={"amount": 1, "reason": "top-up, März"}, headers=bearer
        )
        assert fine.status == 200, await fine.text()

    with_app(tmp_path, monkeypatch, "s3cret", check)


def test_a_key_sent_twice_in_one_object_is_refused_and_nothing_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msgspec reads the last of a repeated key; a proxy or signer in front may read the
    first. The body is refused (naming where), never applied as either reading."""
    bearer = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}

    async def check(client: TestClient[web.Request, web.Application]) -> None:
        created = await client.post("/v1/accounts", json={"currency": "EUR"}, headers=bearer)
        account_id = (await created.json())["id"]
        fund = f"/v1/accounts/{account_id}/fund"
        twice = await client.post(
            fund, data=b'{"amount": 1, "reason": "test", "amount": 100000}', headers=bearer
        )
        error = (await twice.json())["error"]
        assert twice.status == 400 and (error["code"], error["field"]) == (
            "invalid_body",
            "$.amount",
        )
        nested = await client.post(
            "/v1/cards/virtual",
            data=(
                b'{"account_id": "%s", "controls": {"amount_limits": '
                b'[{"amount": 5, "interval": "daily", "currency": "EUR", "amount": 9}]}}'
            )
            % account_id.encode(),
            headers=bearer,
        )
        assert nested.status == 400
        assert (await nested.json())["error"]["field"] == "$.controls.amount_limits[0].amount"
        account = await client.get(f"/v1/accounts/{account_id}", headers=bearer)
        assert (await account.json())["posted"] == 0
        # The same keys in different objects are no repeat.
        once = await client.post(fund, data=b'{"amount": 7, "reason": "test"}', headers=bearer)
        assert once.status == 200
        account = await client.get(f"/v1/accounts/{account_id}", headers=bearer)
        assert (await account.json())["posted"] == 7

    with_app(tmp_path, monkeypatch, "s3cret", check)
