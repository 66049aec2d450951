"""The programme control API against the real daemon: every endpoint, every documented refusal.

Every answer is checked against specs/openapi.yaml (the documented status code and the schema of
its body), so the document cannot drift from what the daemon says. Changes made through the API
are checked on the ISO 8583 side too: a freeze or a controls PUT is in force for the very next
authorisation on a link that was already open.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from harness import PAN_KEY, Link, RunningDaemon, authorization, run_cli, sample, scrape

from processor.api.commands import luhn_check_digit
from processor.security import luhn_valid

pytestmark = pytest.mark.e2e

TOKEN = "e2e-control-api-token"
SPEC = yaml.safe_load((Path(__file__).resolve().parents[2] / "specs" / "openapi.yaml").read_text())
# Path templates as regular expressions, to find the documented operation of a request.
OPERATIONS = [
    (re.compile("^" + re.sub(r"\{[a-z_]+\}", "[^/]+", template) + "$"), template)
    for template in SPEC["paths"]
]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def documented_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The body schema the document gives for this answer; fails when the answer is not in it."""
    templates = [template for pattern, template in OPERATIONS if pattern.match(path)]
    for template in templates:
        operation = SPEC["paths"][template].get(method.lower())
        if operation is None:
            continue
        responses = _resolve(operation["responses"])
        assert str(status) in responses, f"{method} {template} answered undocumented {status}"
        response = _resolve(responses[str(status)])
        content = response.get("content", {}).get("application/json")
        return None if content is None else content["schema"]
    raise AssertionError(f"{method} {path} is not in the document")


def conforms(method: str, path: str, status: int, body: Any) -> None:
    schema = documented_schema(method, path, status)
    assert schema is not None, f"{method} {path} {status}: no documented JSON body"
    validator = jsonschema.Draft202012Validator(
        {**schema, "components": SPEC["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    errors = sorted(validator.iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {errors[0]}"


class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, text: str) -> None:
        self.status = status
        self.headers = headers
        self.text = text
        self.body: Any = json.loads(text) if text else None

    @property
    def code(self) -> str:
        return str(self.body["error"]["code"])

    @property
    def field(self) -> str | None:
        return self.body["error"].get("field")  # type: ignore[no-any-return]


class Api:
    """A client that checks every answer against the OpenAPI document."""

    def __init__(self, port: int, token: str | None = TOKEN) -> None:
        self.port = port
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        documented: bool = True,
    ) -> Answer:
        sent = dict(headers or {})
        if self.token is not None:
            sent.setdefault("Authorization", f"Bearer {self.token}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            answer = Answer(response.status, response.headers, response.read().decode())
        finally:
            connection.close()
        assert answer.status < 500 or answer.status == 503, (method, path, answer.text)
        assert answer.headers.get_content_type() == "application/json", answer.text
        if documented:
            conforms(method, urllib.parse.urlsplit(path).path, answer.status, answer.body)
        return answer

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> Answer:
        return self.call("POST", path, body, **kwargs)

    def put(self, path: str, body: Any = None, **kwargs: Any) -> Answer:
        return self.call("PUT", path, body, **kwargs)


def pan_with(prefix: str) -> str:
    body = prefix.ljust(15, "0")
    return body + luhn_check_digit(body)


_serial = [0]


def unique(name: str) -> str:
    _serial[0] += 1
    return f"{name}-{_serial[0]}"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDaemon]:
    root = tmp_path_factory.mktemp("control-api")
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    running = RunningDaemon(root / "ledger", env=env).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def api(daemon: RunningDaemon) -> Api:
    return Api(daemon.http_port)


@pytest.fixture
def link(daemon: RunningDaemon) -> Iterator[Link]:
    connection = daemon.connect()
    try:
        yield connection
    finally:
        connection.close()


def verified_cardholder(api: Api) -> str:
    """A cardholder whose KYC the programme approved: cards may be issued to it."""
    created = api.post("/v1/cardholders", {"details": ADA})
    assert created.status == 201, created.text
    cardholder_id = created.body["id"]
    approved = api.post(f"/v1/cardholders/{cardholder_id}/kyc", {"status": "approved"})
    assert approved.status == 200, approved.text
    return cardholder_id


ADA = {
    "type": "individual",
    "name": "Ada Quietwater",
    "date_of_birth": "1985-12-10",
    "address": {
        "line1": "Kastanienallee 12",
        "city": "Berlin",
        "postal_code": "10435",
        "country": "DE",
    },
    "email": "ada.quietwater@example.org",
}


def new_account(api: Api, balance: int = 0, currency: str = "EUR", **extra: Any) -> str:
    """An account for a verified cardholder (so virtual cards may be issued on it)."""
    account_id = unique("acct")
    if "cardholder_id" not in extra:
        extra["cardholder_id"] = verified_cardholder(api)
    created = api.post("/v1/accounts", {"id": account_id, "currency": currency, **extra})
    assert created.status == 201, created.text
    if balance:
        funded = api.post(f"/v1/accounts/{account_id}/fund", {"amount": balance, "reason": "test"})
        assert funded.status == 200, funded.text
    return account_id


_pan_serial = [0]


def new_card(api: Api, account_id: str) -> tuple[str, str]:
    """(card id, PAN) of a card registered on the account."""
    _pan_serial[0] += 1
    pan = pan_with(f"4761738{_pan_serial[0]:06d}")
    created = api.post("/v1/cards", {"pan": pan, "expiry": "3012", "account_id": account_id})
    assert created.status == 201, created.text
    return created.body["id"], pan


# --- authentication ----------------------------------------------------------------------------


def test_every_v1_call_needs_the_bearer_token(daemon: RunningDaemon) -> None:
    anonymous = Api(daemon.http_port, token=None)
    missing = anonymous.get("/v1/accounts/demo-main")
    assert (missing.status, missing.code) == (401, "unauthorized")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = Api(daemon.http_port, token="not-the-token").get("/v1/controls")
    assert (wrong.status, wrong.code) == (401, "unauthorized")
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    basic = anonymous.get("/v1/controls", headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status == 401
    refused_write = anonymous.post("/v1/accounts", {"currency": "EUR"})
    assert refused_write.status == 401
    # Health and metrics stay open.
    connection = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=10)
    try:
        for path in ("/healthz", "/readyz", "/metrics"):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status == 200, path
    finally:
        connection.close()


def test_api_switched_off_answers_503_and_needs_no_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROCESSOR_API_TOKEN"}
    env["PROCESSOR_PAN_KEY"] = PAN_KEY
    config = tmp_path / "processor.toml"
    config.write_text(
        "[http]\ncontrol_api = false\n[programme.card_issuing]\nbin_prefix = '476173'\n"
    )
    running = RunningDaemon(tmp_path / "ledger", config=config, env=env, demo=False).start()
    try:
        answer = Api(running.http_port).get("/v1/accounts/demo-main")
        assert (answer.status, answer.code) == (503, "api_disabled")
        assert "http.control_api = false" in answer.body["error"]["message"]
        assert Api(running.http_port, token=None).post("/v1/cards", {}).status == 503
    finally:
        running.stop()


# --- accounts ----------------------------------------------------------------------------------


def test_account_lifecycle(api: Api) -> None:
    generated = api.post("/v1/accounts", {"currency": "JPY", "credit_limit": 500})
    assert generated.status == 201
    assert re.fullmatch(r"acct_[0-9a-f]{24}", generated.body["id"])
    assert (generated.body["available"], generated.body["currency"]) == (500, "JPY")

    account_id = unique("acct")
    created = api.post("/v1/accounts", {"id": account_id, "currency": "EUR"})
    assert created.status == 201
    assert created.body["posted"] == created.body["held"] == created.body["available"] == 0
    assert created.body["status"] == "active"
    assert created.body["controls"]["channels"]["ecommerce"] is True
    assert datetime.fromisoformat(created.body["created"]).tzinfo is not None
    duplicate = api.post("/v1/accounts", {"id": account_id, "currency": "EUR"})
    assert (duplicate.status, duplicate.code, duplicate.field) == (409, "account_exists", "$.id")

    base = f"/v1/accounts/{account_id}"
    funded = api.post(base + "/fund", {"amount": 10_000, "reason": "opening"})
    assert funded.status == 200
    assert funded.body["entry"] == {
        "sequence": 1,
        "kind": "fund",
        "amount": 10_000,
        "reason": "opening",
        "created": funded.body["entry"]["created"],
        "posted_after": 10_000,
    }
    debited = api.post(base + "/debit", {"amount": 2_500, "reason": "fee"})
    assert debited.status == 200
    assert (debited.body["entry"]["kind"], debited.body["entry"]["posted_after"]) == (
        "debit",
        7_500,
    )
    assert debited.body["account"]["available"] == 7_500
    too_much = api.post(base + "/debit", {"amount": 7_501, "reason": "too much"})
    assert (too_much.status, too_much.code) == (409, "insufficient_funds")
    assert api.get(base).body["posted"] == 7_500  # the refusal changed nothing

    not_empty = api.post(base + "/close")
    assert (not_empty.status, not_empty.code) == (409, "account_not_empty")
    assert api.post(base + "/debit", {"amount": 7_500, "reason": "pay out"}).status == 200

    # Entries: newest first, paged with an opaque cursor.
    first = api.get(base + "/entries?limit=2")
    assert [entry["sequence"] for entry in first.body["items"]] == [3, 2]
    assert first.body["next_cursor"]
    second = api.get(base + f"/entries?limit=2&cursor={first.body['next_cursor']}")
    assert [entry["sequence"] for entry in second.body["items"]] == [1]
    assert second.body["next_cursor"] is None
    assert [e["kind"] for e in api.get(base + "/entries").body["items"]] == [
        "debit",
        "debit",
        "fund",
    ]

    closed = api.post(base + "/close")
    assert (closed.status, closed.body["status"]) == (200, "closed")
    for action in ("/fund", "/debit"):
        refused = api.post(base + action, {"amount": 1, "reason": "after close"})
        assert (refused.status, refused.code) == (409, "account_closed")
    again = api.post(base + "/close")
    assert (again.status, again.code) == (409, "account_closed")
    card = api.post("/v1/cards/virtual", {"account_id": account_id})
    assert (card.status, card.code) == (409, "account_closed")


def test_unknown_ids_are_404(api: Api) -> None:
    for path in (
        "/v1/accounts/no-such-account",
        "/v1/accounts/no-such-account/entries",
        "/v1/accounts/no-such-account/controls",
        "/v1/accounts/no-such-account/usage",
        "/v1/accounts/no-such-account/authorizations",
        "/v1/accounts/" + "x" * 65,  # longer than any account id can be
    ):
        answer = api.get(path)
        assert (answer.status, answer.code) == (404, "account_not_found"), path
    for path in (
        "/v1/cards/card_00000000000000000000",
        "/v1/cards/card_00000000000000000000/controls",
        "/v1/cards/card_00000000000000000000/usage",
        "/v1/cards/card_00000000000000000000/authorizations",
        "/v1/cards/not-a-card-id",
    ):
        answer = api.get(path)
        assert (answer.status, answer.code) == (404, "card_not_found"), path
    missing = "/v1/authorizations/" + urllib.parse.quote("0100|1|000001|1124101010", safe="")
    assert api.get(missing).code == "authorization_not_found"
    fund = api.post("/v1/accounts/no-such-account/fund", {"amount": 1, "reason": "x"})
    assert (fund.status, fund.code) == (404, "account_not_found")
    freeze = api.post("/v1/cards/card_00000000000000000000/freeze")
    assert (freeze.status, freeze.code) == (404, "card_not_found")
    card = api.post("/v1/cards/virtual", {"account_id": "no-such-account"})
    assert (card.status, card.code, card.field) == (404, "account_not_found", "$.account_id")
    unknown_route = api.get("/v1/nothing-here", documented=False)
    assert (unknown_route.status, unknown_route.code) == (404, "not_found")
    wrong_method = api.call("DELETE", "/v1/controls", documented=False)
    assert (wrong_method.status, wrong_method.code) == (405, "method_not_allowed")
    assert "PUT" in wrong_method.headers["Allow"]


def test_invalid_requests_name_the_field(api: Api) -> None:
    account_id = new_account(api, balance=100)
    fund = f"/v1/accounts/{account_id}/fund"
    cases: list[tuple[str, Any, str]] = [
        (fund, {"amount": "10", "reason": "x"}, "$.amount"),
        (fund, {"amount": 0, "reason": "x"}, "$.amount"),
        (fund, {"amount": -5, "reason": "x"}, "$.amount"),
        (fund, {"amount": 1.5, "reason": "x"}, "$.amount"),
        (fund, {"amount": 10}, "$.reason"),
        (fund, {"amount": 10, "reason": ""}, "$.reason"),
        (fund, {"amount": 10, "reason": "x" * 201}, "$.reason"),
        (fund, {"amount": 10, "reason": "x", "memo": "y"}, "$.memo"),
        (fund, [1, 2], "$"),
        ("/v1/accounts", {"currency": "EURO"}, "$.currency"),
        ("/v1/accounts", {"currency": "XXX"}, "$.currency"),  # ISO 4217, but no minor unit
        ("/v1/accounts", {"currency": "QQQ"}, "$.currency"),
        ("/v1/accounts", {"currency": "EUR", "id": "bad id"}, "$.id"),
        ("/v1/accounts", {"currency": "EUR", "credit_limit": -1}, "$.credit_limit"),
        (
            "/v1/accounts",
            {"currency": "EUR", "controls": {"blocked_categories": ["casinos"]}},
            "$.controls.blocked_categories[0]",
        ),
        (
            "/v1/accounts",
            {
                "currency": "EUR",
                "controls": {
                    "amount_limits": [{"interval": "daily", "amount": 5, "currency": "USD"}]
                },
            },
            "$.controls.amount_limits[0].currency",
        ),
        (
            "/v1/cards",
            {"pan": "4761739001010011", "expiry": "3012", "account_id": account_id},
            "$.pan",
        ),
        (
            "/v1/cards",
            {"pan": "4761739001010010", "expiry": "3013", "account_id": account_id},
            "$.expiry",
        ),
        (
            "/v1/cards/virtual",
            {"account_id": account_id, "controls": {"bogus": 1}},
            "$.controls.bogus",
        ),
    ]
    for path, body, field in cases:
        answer = api.post(path, body)
        assert (answer.status, answer.code, answer.field) == (400, "invalid_body", field), (
            path,
            body,
            answer.text,
        )
        assert "4761739001010011" not in answer.text  # a card number is never echoed
    not_json = api.post(fund, raw=b"{amount: 1")
    assert (not_json.status, not_json.code) == (400, "invalid_json")
    form = api.post(
        fund, raw=b"amount=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert (form.status, form.code) == (415, "unsupported_media_type")
    no_type = api.call("POST", fund, raw=b"", headers={"Content-Type": "text/plain"})
    assert no_type.status == 415
    huge = api.post(fund, {"amount": 1, "reason": "x" * (70 * 1024)})
    assert (huge.status, huge.code) == (413, "body_too_large")
    for query, field in (
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("cursor=%%%", "cursor"),
        ("cursor=AAAA", "cursor"),
        ("limt=5", "limt"),
    ):
        answer = api.get(f"/v1/accounts/{account_id}/entries?{query}")
        assert (answer.status, answer.code, answer.field) == (400, "invalid_query", field), query
    # Nothing of the above reached the ledger.
    assert api.get(f"/v1/accounts/{account_id}").body["posted"] == 100
    assert len(api.get(f"/v1/accounts/{account_id}/entries").body["items"]) == 1


# --- idempotency -------------------------------------------------------------------------------


def test_idempotent_replay_has_no_second_effect(api: Api) -> None:
    account_id = new_account(api)
    fund = f"/v1/accounts/{account_id}/fund"
    body = {"amount": 1_000, "reason": "top-up 42"}
    first = api.post(fund, body, headers={"Idempotency-Key": "top-up-42"})
    assert first.status == 200 and "Idempotent-Replayed" not in first.headers
    replay = api.post(fund, body, headers={"Idempotency-Key": "top-up-42"})
    assert (replay.status, replay.headers["Idempotent-Replayed"]) == (200, "true")
    assert replay.body == first.body
    assert api.get(f"/v1/accounts/{account_id}").body["posted"] == 1_000
    assert len(api.get(f"/v1/accounts/{account_id}/entries").body["items"]) == 1

    other = api.post(
        fund, {"amount": 2_000, "reason": "x"}, headers={"Idempotency-Key": "top-up-42"}
    )
    assert (other.status, other.code) == (409, "idempotency_key_reused")
    # A key is the programme's: the same key on another path (the same body) is a client's
    # mistake, refused; it was applied, a debit undoing the funding the key made.
    for path in (f"/v1/accounts/{account_id}/debit", f"/v1/accounts/{new_account(api)}/fund"):
        reused = api.post(path, body, headers={"Idempotency-Key": "top-up-42"})
        assert (reused.status, reused.code) == (409, "idempotency_key_reused"), path
    # Without a key, a repeat is applied again.
    assert api.post(fund, body).status == 200
    assert api.post(fund, body).status == 200
    assert api.get(f"/v1/accounts/{account_id}").body["posted"] == 3_000

    # A refusal is not kept: once the cause is fixed, the same key goes through.
    key = {"Idempotency-Key": "big-debit"}
    refused = api.post(
        f"/v1/accounts/{account_id}/debit", {"amount": 5_000, "reason": "x"}, headers=key
    )
    assert refused.code == "insufficient_funds"
    api.post(fund, {"amount": 3_000, "reason": "more"})
    applied = api.post(
        f"/v1/accounts/{account_id}/debit", {"amount": 5_000, "reason": "x"}, headers=key
    )
    assert applied.status == 200 and "Idempotent-Replayed" not in applied.headers

    for bad in ("", "k" * 256, "tab\tkey"):
        answer = api.post(fund, body, headers={"Idempotency-Key": bad})
        assert (answer.status, answer.code) == (400, "invalid_idempotency_key"), repr(bad)
    assert api.post(fund, body, headers={"Idempotency-Key": "k" * 255}).status == 200


def test_concurrent_repeats_apply_once(api: Api) -> None:
    account_id = new_account(api)
    answers: list[Answer] = []
    lock = threading.Lock()

    def send() -> None:
        answer = api.post(
            f"/v1/accounts/{account_id}/fund",
            {"amount": 700, "reason": "race"},
            headers={"Idempotency-Key": "race-1"},
        )
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answers) == 8
    assert {answer.status for answer in answers} == {200}
    assert sum("Idempotent-Replayed" not in answer.headers for answer in answers) == 1
    assert len({answer.text for answer in answers}) == 1
    assert api.get(f"/v1/accounts/{account_id}").body["posted"] == 700
    assert len(api.get(f"/v1/accounts/{account_id}/entries").body["items"]) == 1


# --- cards -------------------------------------------------------------------------------------


def test_virtual_card_number_is_answered_once(daemon: RunningDaemon, api: Api, link: Link) -> None:
    account_id = new_account(api, balance=50_000)
    key = {"Idempotency-Key": "virtual-card-1"}
    issued = api.post("/v1/cards/virtual", {"account_id": account_id}, headers=key)
    assert issued.status == 201
    pan = issued.body["pan"]
    assert len(pan) == 16 and pan.startswith("476173") and luhn_valid(pan)
    assert issued.body["masked_pan"] == pan[:6] + "******" + pan[-4:]
    assert issued.body["virtual"] is True and issued.body["status"] == "active"
    now = datetime.now(UTC)
    months = now.year * 12 + now.month - 1 + 36
    assert issued.body["expiry"] == f"{(months // 12) % 100:02d}{months % 12 + 1:02d}"

    # Its CVC2 (the demo's development key for BIN 476173), answered once like the number.
    cvc2 = issued.body["cvc2"]
    assert len(cvc2) == 3 and cvc2.isdigit() and issued.body["cvc2_checked"] is True

    card_id = issued.body["id"]
    shown = api.get(f"/v1/cards/{card_id}")
    assert "pan" not in shown.body and pan not in shown.text and "cvc2" not in shown.body
    assert {k: v for k, v in issued.body.items() if k not in ("pan", "cvc2")} == shown.body
    replay = api.post("/v1/cards/virtual", {"account_id": account_id}, headers=key)
    assert (replay.status, replay.headers["Idempotent-Replayed"]) == (201, "true")
    assert "pan" not in replay.body and pan not in replay.text and "cvc2" not in replay.body
    assert replay.body == shown.body
    # One card, not two.
    other = api.post("/v1/cards/virtual", {"account_id": account_id})
    assert other.body["id"] != card_id and other.body["pan"] != pan

    # The number works on the network side, with the expiry the API gave.
    response = link.exchange(authorization(pan=pan, amount=1_234, **{"14": issued.body["expiry"]}))
    assert response["39"] == "00"
    # On the web, with the CVC2 in field 48 subelement 92: a wrong one is 82, the right one 00.
    online = {"14": issued.body["expiry"], "22": "810", "25": "59"}
    wrong = f"{(int(cvc2) + 1) % 1000:03d}"
    assert (
        link.exchange(authorization(pan=pan, amount=100, **online, **{"48": f"R9203{wrong}"}))["39"]
        == "82"
    )
    assert api.get(f"/v1/cards/{card_id}").body["cvc2_failures"] == 1
    assert (
        link.exchange(authorization(pan=pan, amount=100, **online, **{"48": f"R9203{cvc2}"}))["39"]
        == "00"
    )
    assert api.get(f"/v1/cards/{card_id}").body["cvc2_failures"] == 0
    logs = "".join(daemon.stdout) + daemon.stderr()
    assert pan not in logs and f"R9203{cvc2}" not in logs
    # Nor in the ledger's file, the events or the metrics (CVC2s are three digits, so they are
    # looked for with their subelement's tag and length, as they travel).
    from harness import run_cli

    listed = run_cli("events", "list", "--ledger", str(daemon.ledger), "--limit", "100000")
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/metrics") as response:
        metrics = response.read().decode()
    stored = (daemon.ledger / "data.mdb").read_bytes().decode("latin-1")
    for where, text in {"ledger": stored, "events": listed.stdout, "metrics": metrics}.items():
        assert pan not in text and f"9203{cvc2}" not in text, where
    assert '"cvc2":"mismatch"' in listed.stdout.replace(" ", "")


def test_cardholders_kyc_gates_issuing_and_personal_data_stays_sealed(
    daemon: RunningDaemon, api: Api
) -> None:
    from harness import run_cli

    created = api.post("/v1/cardholders", {"details": ADA})
    assert created.status == 201 and created.body["kyc_status"] == "pending"
    cardholder_id = created.body["id"]
    shown = api.get(f"/v1/cardholders/{cardholder_id}")
    assert shown.status == 200 and shown.body["details"] == ADA
    account_id = new_account(api, balance=10_000, cardholder_id=cardholder_id)
    for status in ("review", "rejected"):
        assert api.post(f"/v1/cardholders/{cardholder_id}/kyc", {"status": status}).status == 200
        refused = api.post("/v1/cards/virtual", {"account_id": account_id})
        assert (refused.status, refused.code) == (409, "kyc_not_approved")
        assert refused.body["error"]["details"] == {"status": status}
    approved = api.post(f"/v1/cardholders/{cardholder_id}/kyc", {"status": "approved"})
    assert approved.status == 200 and "details" not in approved.body
    issued = api.post("/v1/cards/virtual", {"account_id": account_id})
    assert issued.status == 201 and issued.body["cardholder_id"] == cardholder_id
    bad = api.post("/v1/cardholders", {"details": dict(ADA, phone="12345")})
    assert (bad.status, bad.code, bad.field) == (400, "invalid_body", "$.details.phone")

    # No personal data in logs, metrics, events or the ledger's file: only the id and status.
    listed = run_cli("events", "list", "--ledger", str(daemon.ledger), "--limit", "100000")
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}/metrics") as response:
        metrics = response.read().decode()
    places = {
        "logs": "".join(daemon.stdout) + daemon.stderr(),
        "metrics": metrics,
        "events": listed.stdout,
        "ledger": (daemon.ledger / "data.mdb").read_bytes().decode("latin-1"),
    }
    for where, text in places.items():
        for secret in ("Quietwater", "Kastanienallee", "ada.quietwater", "1985-12-10"):
            assert secret not in text, (where, secret)
    assert f'"cardholder_id":"{cardholder_id}"' in listed.stdout.replace(" ", "")
    assert '"kyc_status":"approved"' in listed.stdout.replace(" ", "")


def test_a_physical_card_walked_by_the_bureau_then_activated(
    daemon: RunningDaemon, api: Api, link: Link
) -> None:
    from harness import run_cli

    account_id = new_account(api, balance=50_000)
    ordered = api.post(
        "/v1/cards/physical", {"account_id": account_id, "shipping_address": ADA["address"]}
    )
    assert ordered.status == 201, ordered.text
    assert (ordered.body["status"], ordered.body["fulfilment"]) == ("inactive", "ordered")
    card_id, pan, expiry = ordered.body["id"], ordered.body["pan"], ordered.body["expiry"]
    assert link.exchange(authorization(pan=pan, amount=100, **{"14": expiry}))["39"] == "62"
    early = api.post(f"/v1/cards/{card_id}/activate")
    assert (early.status, early.code) == (409, "card_not_activatable")

    env = dict(os.environ, PROCESSOR_API_TOKEN=TOKEN)
    url = f"http://127.0.0.1:{daemon.http_port}"
    bureau = run_cli("sim", "bureau", "--api", url, "--card", card_id, "--to", "shipped", env=env)
    assert bureau.returncode == 0, bureau.stdout + bureau.stderr
    assert bureau.stdout.splitlines() == [
        f"card {card_id}: in_production",
        f"card {card_id}: shipped",
    ]
    assert api.post(f"/v1/cards/{card_id}/activate").body["status"] == "active"
    assert link.exchange(authorization(pan=pan, amount=100, **{"14": expiry}))["39"] == "00"
    assert "Kastanienallee" not in "".join(daemon.stdout) + daemon.stderr()

    # Lost: it stops at once, and its replacement ships where it went.
    replaced = api.post(f"/v1/cards/{card_id}/replace", {"reason": "lost"})
    assert replaced.status == 201 and replaced.body["replaces"] == card_id
    assert link.exchange(authorization(pan=pan, amount=100, **{"14": expiry}))["39"] == "41"


def reveal_url(daemon: RunningDaemon, api: Api, card_id: str) -> str:
    granted = api.post(f"/v1/cards/{card_id}/reveal-token")
    assert granted.status == 201, granted.text
    assert granted.body["url"] == f"/reveal/{card_id}/{granted.body['token']}"
    return f"http://127.0.0.1:{daemon.http_port}{granted.body['url']}"


def chromium_dom(url: str) -> str:
    """The page as a real browser renders it: headless Chromium's DOM after loading `url`."""
    shown = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    return shown.stdout


def grouped(pan: str) -> str:
    return " ".join(pan[index : index + 4] for index in range(0, len(pan), 4))


def test_the_card_details_page_shows_a_card_once_with_strict_headers(
    daemon: RunningDaemon, api: Api
) -> None:
    account_id = new_account(api, balance=1_000)
    issued = api.post("/v1/cards/virtual", {"account_id": account_id}).body
    card_id, pan, cvc2 = issued["id"], issued["pan"], issued["cvc2"]
    url = reveal_url(daemon, api, card_id)
    with pytest.raises(urllib.error.HTTPError) as head:  # a link checker's HEAD spends nothing
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"))
    assert head.value.code == 405
    head.value.close()
    with urllib.request.urlopen(url) as response:  # no bearer token: the browser has none
        page = response.read().decode()
        headers = response.headers
    assert grouped(pan) in page and f'<dd id="cvc2">{cvc2}</dd>' in page
    assert f"{issued['expiry'][2:]}/{issued['expiry'][:2]}" in page
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    # Used: the same address shows the refusal, as does a token on another card's address.
    for address in (url, url.replace(card_id, new_card(api, account_id)[0])):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(address)
        assert refused.value.code == 404
        body = refused.value.read().decode()
        refused.value.close()
        assert "This link cannot show a card" in body and pan not in body
    registered, _ = new_card(api, account_id)  # its number is not kept: nothing to show
    answer = api.post(f"/v1/cards/{registered}/reveal-token")
    assert (answer.status, answer.code) == (409, "card_not_revealable")
    assert pan not in "".join(daemon.stdout) + daemon.stderr()
    assert pan not in (daemon.ledger / "data.mdb").read_bytes().decode("latin-1")


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Chromium (Debian: apt-get install chromium)"
)
def test_the_card_details_page_in_a_real_headless_browser(daemon: RunningDaemon, api: Api) -> None:
    account_id = new_account(api, balance=1_000)
    issued = api.post("/v1/cards/virtual", {"account_id": account_id}).body
    other = api.post("/v1/cards/virtual", {"account_id": account_id}).body

    rendered = chromium_dom
    url = reveal_url(daemon, api, issued["id"])
    first = rendered(url)
    assert grouped(issued["pan"]) in first and issued["cvc2"] in first
    assert "This link cannot show a card" in rendered(url)  # a second use
    foreign = reveal_url(daemon, api, other["id"]).replace(other["id"], issued["id"])
    assert "This link cannot show a card" in rendered(foreign)  # another card's token
    assert grouped(other["pan"]) not in rendered(foreign)


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Chromium (Debian: apt-get install chromium)"
)
def test_an_expired_card_details_link_shows_the_refusal_in_a_browser(tmp_path: Path) -> None:
    config = tmp_path / "processor.toml"
    config.write_text("[security]\nreveal_token_seconds = 10\n")
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    running = RunningDaemon(tmp_path / "ledger", config=config, env=env).start()
    try:
        api = Api(running.http_port)
        account_id = new_account(api, balance=1_000)
        issued = api.post("/v1/cards/virtual", {"account_id": account_id}).body
        url = reveal_url(running, api, issued["id"])
        time.sleep(10.5)  # the token's whole life
        rendered = chromium_dom
        late = rendered(url)
        assert "This link cannot show a card" in late and grouped(issued["pan"]) not in late
        # The same daemon shows a fresh token's card: the refusal above was the expiry's.
        assert grouped(issued["pan"]) in rendered(reveal_url(running, api, issued["id"]))
    finally:
        running.stop()


def test_guessed_card_details_links_cost_no_write_and_are_limited(tmp_path: Path) -> None:
    """Every guess was a write command in the authorisation batches (about a thousand a
    second from one client), neither logged nor counted. A daemon of its own: the limit is
    per client address, and every test here comes from 127.0.0.1."""
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    running = RunningDaemon(tmp_path / "ledger", env=env).start()
    try:
        before = sample(scrape(running), "processor_commit_batch_size_count", 0)
        base = f"http://127.0.0.1:{running.http_port}/reveal/card_0000000000000000000a/"
        codes = []
        for guess in range(25):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + f"{guess:064x}")
            codes.append(refused.value.code)
            refused.value.close()
        assert codes == [404] * 20 + [429] * 5
        metrics = scrape(running)
        assert sample(metrics, "processor_commit_batch_size_count", 0) == before
        assert sample(metrics, 'processor_reveal_refusals_total{reason="no_token"}') == 20
        assert sample(metrics, 'processor_reveal_refusals_total{reason="rate_limited"}') == 5
        assert "card details page refused (no_token) to 127.0.0.1" in running.stderr()
    finally:
        running.stop()


def test_register_card(api: Api) -> None:
    account_id = new_account(api)
    pan = pan_with("4761737700001")
    created = api.post("/v1/cards", {"pan": pan, "expiry": "2905", "account_id": account_id})
    assert created.status == 201
    assert created.body["masked_pan"] == pan[:6] + "******" + pan[-4:]
    assert (created.body["expiry"], created.body["virtual"]) == ("2905", False)
    assert pan not in created.text
    again = api.post("/v1/cards", {"pan": pan, "expiry": "2905", "account_id": account_id})
    assert (again.status, again.code, again.field) == (409, "card_exists", "$.pan")
    assert created.body["id"] in again.body["error"]["message"] and pan not in again.text
    unknown = api.post(
        "/v1/cards", {"pan": pan_with("47617377"), "expiry": "2905", "account_id": "nope"}
    )
    assert (unknown.status, unknown.code) == (404, "account_not_found")


def test_card_status_transitions(api: Api) -> None:
    card_id, _ = new_card(api, new_account(api))
    base = f"/v1/cards/{card_id}"
    assert api.post(base + "/freeze").body["status"] == "frozen"
    twice = api.post(base + "/freeze")
    assert (twice.status, twice.code) == (409, "invalid_card_transition")
    assert twice.body["error"]["details"] == {"from": "frozen", "to": "frozen"}
    assert api.post(base + "/unfreeze").body["status"] == "active"
    thawed = api.post(base + "/unfreeze")
    assert thawed.body["error"]["details"] == {"from": "active", "to": "active"}
    assert api.post(base + "/report-lost").body["status"] == "lost"
    for action, target in (
        ("unfreeze", "active"),
        ("freeze", "frozen"),
        ("report-stolen", "stolen"),
        ("close", "closed"),
    ):
        refused = api.post(f"{base}/{action}")
        assert (refused.status, refused.code) == (409, "invalid_card_transition"), action
        assert refused.body["error"]["details"] == {"from": "lost", "to": target}
    assert api.get(base).body["status"] == "lost"

    stolen, _ = new_card(api, new_account(api))
    api.post(f"/v1/cards/{stolen}/freeze")
    assert api.post(f"/v1/cards/{stolen}/report-stolen").body["status"] == "stolen"
    closing, _ = new_card(api, new_account(api))
    assert api.post(f"/v1/cards/{closing}/close").body["status"] == "closed"
    assert api.post(f"/v1/cards/{closing}/unfreeze").code == "invalid_card_transition"


def test_freeze_applies_to_the_next_message_on_an_open_link(api: Api, link: Link) -> None:
    account_id = new_account(api, balance=100_000)
    card_id, pan = new_card(api, account_id)
    approved = link.exchange(authorization(pan=pan, amount=1_000))
    assert approved["39"] == "00"
    assert api.post(f"/v1/cards/{card_id}/freeze").status == 200
    declined = link.exchange(authorization(pan=pan, amount=1_000))
    assert declined["39"] == "62"

    history = api.get(f"/v1/cards/{card_id}/authorizations")
    newest, oldest = history.body["items"]
    assert (newest["response_code"], newest["reason"]) == ("62", "card_frozen")
    assert (oldest["response_code"], oldest["reason"]) == ("00", "approved")
    assert (oldest["amount"], oldest["currency"], oldest["hold_status"]) == (1_000, "EUR", "open")
    assert oldest["approval_code"] == approved["38"] and oldest["mti"] == "0100"
    assert (oldest["card_id"], oldest["account_id"]) == (card_id, account_id)
    one = api.get("/v1/authorizations/" + urllib.parse.quote(newest["id"], safe=""))
    assert one.body == newest
    assert api.get(f"/v1/accounts/{account_id}").body["held"] == 1_000

    assert api.post(f"/v1/cards/{card_id}/unfreeze").status == 200
    assert link.exchange(authorization(pan=pan, amount=1_000))["39"] == "00"


def test_controls_apply_to_the_next_message(api: Api, link: Link) -> None:
    account_id = new_account(api, balance=1_000_000)
    card_id, pan = new_card(api, account_id)
    assert link.exchange(authorization(pan=pan, amount=100))["39"] == "00"

    card_controls = f"/v1/cards/{card_id}/controls"
    empty = api.get(card_controls).body
    assert empty["blocked_mccs"] == [] and empty["channels"]["chip"] is True
    put = api.put(card_controls, {"blocked_mccs": ["5411"]})
    assert (put.status, put.body["blocked_mccs"]) == (200, ["5411"])
    assert api.get(card_controls).body == put.body
    assert link.exchange(authorization(pan=pan, amount=100))["39"] == "57"
    assert link.exchange(authorization(pan=pan, amount=100, **{"18": "5812"}))["39"] == "00"

    account_limit = {
        "amount_limits": [{"interval": "per_authorization", "amount": 50_000, "currency": "EUR"}]
    }
    assert api.put(f"/v1/accounts/{account_id}/controls", account_limit).status == 200
    over = link.exchange(authorization(pan=pan, amount=50_001, **{"18": "5812"}))
    assert over["39"] == "61"

    programme = api.get("/v1/controls").body
    try:
        no_web = {**programme, "channels": {**programme["channels"], "ecommerce": False}}
        assert api.put("/v1/controls", no_web).status == 200
        online = authorization(pan=pan, amount=100, **{"18": "5812", "25": "59"})
        assert link.exchange(online)["39"] == "57"
    finally:
        assert api.put("/v1/controls", programme).status == 200

    items = api.get(f"/v1/cards/{card_id}/authorizations?limit=3").body["items"]
    assert [item["reason"] for item in items] == [
        "channel_blocked:ecommerce",
        "per_authorization_amount_limit",
        "approved",
    ]
    fourth = api.get(f"/v1/cards/{card_id}/authorizations?limit=4").body["items"][3]
    assert fourth["reason"] == "mcc_blocked"

    # PUT replaces the whole set: an empty object clears it.
    assert api.put(card_controls, {}).body["blocked_mccs"] == []
    assert link.exchange(authorization(pan=pan, amount=100))["39"] == "00"


def test_controls_validation(api: Api) -> None:
    account_id = new_account(api, currency="USD")
    card_id, _ = new_card(api, account_id)
    cases: list[tuple[str, Any, str]] = [
        ("/v1/controls", {"blocked_categories": ["gambling", "casino"]}, "$.blocked_categories[1]"),
        ("/v1/controls", {"allowed_countries": ["narnia"]}, "$.allowed_countries[0]"),
        ("/v1/controls", {"allowed_mccs": ["54111"]}, "$.allowed_mccs[0]"),
        ("/v1/controls", {"channels": {"ecommerce": "no"}}, "$.channels.ecommerce"),
        ("/v1/controls", {"count_limits": [{"count": 5}]}, "$.count_limits[0]"),
        (
            "/v1/controls",
            {"count_limits": [{"count": 5, "interval": "daily", "window_seconds": 60}]},
            "$.count_limits[0]",
        ),
        (
            f"/v1/accounts/{account_id}/controls",
            {"amount_limits": [{"interval": "daily", "amount": 5, "currency": "EUR"}]},
            "$.amount_limits[0].currency",
        ),
        (
            f"/v1/cards/{card_id}/controls",
            {"amount_limits": [{"interval": "weekly", "amount": 5, "currency": "EUR"}]},
            "$.amount_limits[0].currency",
        ),
        (f"/v1/cards/{card_id}/controls", {"limits": []}, "$.limits"),
    ]
    for path, body, field in cases:
        answer = api.put(path, body)
        assert (answer.status, answer.code, answer.field) == (400, "invalid_body", field), (
            path,
            answer.text,
        )
    # The programme keeps a limit per currency: one in another currency than an account's is fine.
    programme = api.get("/v1/controls").body
    assert programme["blocked_categories"] == ["gambling"]  # from the demo data
    usd = {"amount_limits": [{"interval": "daily", "amount": 10**9, "currency": "USD"}]}
    card_limit = api.put(f"/v1/cards/{card_id}/controls", usd)
    assert card_limit.status == 200
    assert api.get(f"/v1/cards/{card_id}").body["controls"] == card_limit.body
    assert api.get(f"/v1/accounts/{account_id}/controls").body["amount_limits"] == []
    form = api.put("/v1/controls", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert form.status == 415


def test_usage_shows_the_current_periods(api: Api, link: Link) -> None:
    account_id = new_account(api, balance=1_000_000)
    card_id, pan = new_card(api, account_id)
    other_card, other_pan = new_card(api, account_id)
    fresh = api.get(f"/v1/cards/{card_id}/usage").body
    assert fresh["daily"] == {
        "start": datetime.now(UTC).date().isoformat(),
        "amount": 0,
        "count": 0,
        "categories": {},
    }
    assert fresh["all_time"]["start"] is None
    assert link.exchange(authorization(pan=pan, amount=1_500))["39"] == "00"
    assert link.exchange(authorization(pan=pan, amount=500, **{"18": "5812"}))["39"] == "00"
    assert link.exchange(authorization(pan=other_pan, amount=250))["39"] == "00"

    card = api.get(f"/v1/cards/{card_id}/usage").body
    assert (card["scope"], card["id"], card["currency"]) == ("card", card_id, "EUR")
    for interval in ("daily", "weekly", "monthly", "yearly", "all_time"):
        assert (card[interval]["amount"], card[interval]["count"]) == (2_000, 2), interval
    assert card["daily"]["categories"] == {
        "groceries": {"amount": 1_500, "count": 1},
        "restaurants": {"amount": 500, "count": 1},
    }
    assert card["trailing"]["count"] == 2
    account = api.get(f"/v1/accounts/{account_id}/usage").body
    assert (account["scope"], account["monthly"]["amount"], account["monthly"]["count"]) == (
        "account",
        2_250,
        3,
    )
    assert api.get(f"/v1/cards/{other_card}/usage").body["daily"]["amount"] == 250


def test_authorization_listings_page(api: Api, link: Link) -> None:
    account_id = new_account(api, balance=1_000_000)
    card_id, pan = new_card(api, account_id)
    other_id, other_pan = new_card(api, account_id)
    amounts = [101, 102, 103, 104, 105]
    for amount in amounts:
        assert link.exchange(authorization(pan=pan, amount=amount))["39"] == "00"
    assert link.exchange(authorization(pan=other_pan, amount=999))["39"] == "00"

    seen: list[int] = []
    cursor = None
    for _ in range(10):  # bounded: 5 items at 2 a page
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(f"/v1/cards/{card_id}/authorizations{query}").body
        seen += [item["amount"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == amounts[::-1]
    by_account = api.get(f"/v1/accounts/{account_id}/authorizations").body["items"]
    assert sorted(item["amount"] for item in by_account) == [*amounts, 999]
    assert {item["card_id"] for item in by_account} == {card_id, other_id}

    first = api.get(f"/v1/cards/{card_id}/authorizations?limit=1").body
    foreign = api.get(f"/v1/cards/{other_id}/authorizations?cursor={first['next_cursor']}")
    assert (foreign.status, foreign.code, foreign.field) == (400, "invalid_query", "cursor")
    # An account may take a card's id as its own: the card's cursor is not its listing's (it
    # ended that listing at once, 200 and empty). Nor is a cursor naming another card's
    # authorisation under this card's id.
    twin = api.post("/v1/accounts", {"currency": "EUR", "id": card_id})
    assert twin.status == 201, twin.text
    crossed = api.get(f"/v1/accounts/{card_id}/authorizations?cursor={first['next_cursor']}")
    assert (crossed.status, crossed.code, crossed.field) == (400, "invalid_query", "cursor")
    others = api.get(f"/v1/cards/{other_id}/authorizations").body["items"]
    forged = base64.urlsafe_b64encode(b"c:" + card_id.encode() + b"\x00" + others[0]["id"].encode())
    stolen = api.get(f"/v1/cards/{card_id}/authorizations?cursor={forged.decode().rstrip('=')}")
    assert (stolen.status, stolen.code, stolen.field) == (400, "invalid_query", "cursor")


def test_a_lowered_cvc2_limit_locks_the_cards_past_it_at_the_next_start(tmp_path: Path) -> None:
    env = dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY, PROCESSOR_API_TOKEN=TOKEN)
    config = tmp_path / "processor.toml"
    config.write_text("[security]\ncvc2_attempts_max = 3\n")
    running = RunningDaemon(tmp_path / "ledger", config=config, env=env).start()
    try:
        api = Api(running.http_port)
        issued = api.post("/v1/cards/virtual", {"account_id": new_account(api, balance=50_000)})
        assert issued.status == 201, issued.text
        card_id, pan, cvc2 = issued.body["id"], issued.body["pan"], issued.body["cvc2"]
        online = {"14": issued.body["expiry"], "22": "810", "25": "59"}
        wrong = f"{(int(cvc2) + 1) % 1000:03d}"
        link = running.connect()
        for _ in range(2):
            sent = authorization(pan=pan, amount=100, **online, **{"48": f"R9203{wrong}"})
            assert link.exchange(sent)["39"] == "82"
        link.close()
    finally:
        running.stop()
    assert (
        "card.cvc2_locked"
        not in run_cli("events", "list", "--ledger", str(tmp_path / "ledger")).stdout
    )

    config.write_text("[security]\ncvc2_attempts_max = 2\n")
    running = RunningDaemon(tmp_path / "ledger", config=config, env=env).start()
    try:
        assert "cvc2_attempts_max lowered to 2: 1 cards" in running.stderr()
        api = Api(running.http_port)
        assert api.get(f"/v1/cards/{card_id}").body["cvc2_failures"] == 2
        link = running.connect()
        sent = authorization(pan=pan, amount=100, **online, **{"48": f"R9203{cvc2}"})
        assert link.exchange(sent)["39"] == "57"  # locked: even the right CVC2, online
        link.close()
    finally:
        running.stop()
    listed = run_cli("events", "list", "--ledger", str(tmp_path / "ledger"), "--limit", "1000")
    locked = [line for line in listed.stdout.splitlines() if "card.cvc2_locked" in line]
    assert len(locked) == 1 and card_id in locked[0]
