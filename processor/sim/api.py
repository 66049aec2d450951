"""A tiny client for the processor's control API, as a programme backend would call it.

The simulator uses it for the scenarios that need the programme's side of the story (register a
card, freeze it, swipe it). It speaks plain HTTP + JSON to the URL given; it knows nothing of how
the daemon serves it.
"""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import msgspec

REQUEST_SECONDS = 10.0  # one API call; a slow answer is a failure, not a hang
# The simulated programme's cardholder: made up, as a test system's are.
SIM_PERSON: dict[str, Any] = {
    "type": "individual",
    "name": "Sim Cardholder",
    "date_of_birth": "1990-01-01",
    "address": {
        "line1": "1 Test Street",
        "city": "Berlin",
        "postal_code": "10115",
        "country": "DE",
    },
}


class ApiProblem(Exception):
    """An API call that did not answer as the scenario needed; says which call and why."""


class _ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str = ""


class _ErrorBody(msgspec.Struct, frozen=True):
    error: _ErrorDetail


class CardCreated(msgspec.Struct, frozen=True):
    id: str  # the card id; everything else in the body is not needed here


class CardIssued(msgspec.Struct, frozen=True):
    """A virtual card as issued: the only answer that holds its number and CVC2."""

    id: str
    pan: str
    expiry: str
    cvc2: str | None = None  # absent when the daemon has no card verification key for the BIN


class ApiAnswer(msgspec.Struct, frozen=True):
    status: int
    body: bytes

    @property
    def error_code(self) -> str | None:
        """`error.code` of an error body, None when the body is not one."""
        try:
            return msgspec.json.decode(self.body, type=_ErrorBody).error.code
        except msgspec.DecodeError:
            return None

    def describe(self) -> str:
        try:
            error = msgspec.json.decode(self.body, type=_ErrorBody).error
        except msgspec.DecodeError:
            return f"HTTP {self.status}"
        return f"HTTP {self.status} {error.code}: {error.message}"[:160]


class ControlApi:
    """One HTTP session against `base_url` (e.g. http://127.0.0.1:8080) with a bearer token."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=REQUEST_SECONDS),
        )

    async def close(self) -> None:
        await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> ApiAnswer:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        data = msgspec.json.encode(body) if body is not None else None
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._session.request(
                method, self.base_url + path, data=data, headers=headers
            ) as response:
                return ApiAnswer(response.status, await response.read())
        except (aiohttp.ClientError, TimeoutError) as error:
            raise ApiProblem(f"{method} {path}: {type(error).__name__}: {error}") from None

    async def expect(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        ok: tuple[int, ...] = (200,),
        idempotency_key: str | None = None,
    ) -> ApiAnswer:
        """The answer when its status is in `ok`; ApiProblem naming the call otherwise."""
        answer = await self.call(method, path, body, idempotency_key=idempotency_key)
        if answer.status not in ok:
            raise ApiProblem(f"{method} {path}: {answer.describe()}")
        return answer

    # --- the calls the scenarios make ------------------------------------------------------------

    async def ensure_account(self, account_id: str, currency: str) -> bool:
        """Create the account; True when created now, False when it already existed."""
        answer = await self.call("POST", "/v1/accounts", {"id": account_id, "currency": currency})
        if answer.status == 201:
            return True
        if answer.status == 409 and answer.error_code == "account_exists":
            return False
        raise ApiProblem(f"POST /v1/accounts: {answer.describe()}")

    async def fund(self, account_id: str, amount: int, reason: str, idempotency_key: str) -> None:
        await self.expect(
            "POST",
            f"/v1/accounts/{account_id}/fund",
            {"amount": amount, "reason": reason},
            ok=(200, 201),
            idempotency_key=idempotency_key,
        )

    async def register_new_card(self, pan: str, expiry: str, account_id: str) -> str | None:
        """The new card's id; None when the number is registered already (409 card_exists).

        A key of its own per call: the call is retried safely, and never replays an old run's."""
        answer = await self.call(
            "POST",
            "/v1/cards",
            {"pan": pan, "expiry": expiry, "account_id": account_id},
            idempotency_key=f"sim-card-{uuid.uuid4()}",
        )
        if answer.status == 409 and answer.error_code == "card_exists":
            return None
        if answer.status not in (200, 201):
            raise ApiProblem(f"POST /v1/cards: {answer.describe()}")
        try:
            return msgspec.json.decode(answer.body, type=CardCreated).id
        except msgspec.DecodeError as error:
            raise ApiProblem(f"POST /v1/cards: answer without a card id: {error}") from None

    async def new_cardholder(self) -> str:
        """A made-up person, KYC pending."""
        answer = await self.expect("POST", "/v1/cardholders", {"details": SIM_PERSON}, ok=(201,))
        try:
            return msgspec.json.decode(answer.body, type=CardCreated).id
        except msgspec.DecodeError as error:
            raise ApiProblem(f"POST /v1/cardholders: answer without an id: {error}") from None

    async def verified_cardholder(self) -> str:
        """A made-up person whose KYC the simulated programme approves at once."""
        cardholder_id = await self.new_cardholder()
        await self.expect("POST", f"/v1/cardholders/{cardholder_id}/kyc", {"status": "approved"})
        return cardholder_id

    async def issue_virtual_card(self, account_id: str, cardholder_id: str) -> CardIssued:
        """A new card each call (no idempotency key: a rerun is meant to get another)."""
        answer = await self.expect(
            "POST",
            "/v1/cards/virtual",
            {"account_id": account_id, "cardholder_id": cardholder_id},
            ok=(201,),
        )
        try:
            return msgspec.json.decode(answer.body, type=CardIssued)
        except msgspec.DecodeError as error:
            raise ApiProblem(f"POST /v1/cards/virtual: unexpected answer: {error}") from None

    async def order_physical_card(self, account_id: str, cardholder_id: str) -> CardIssued:
        """A card for the bureau to print, shipped to the simulated cardholder's address."""
        body = {
            "account_id": account_id,
            "cardholder_id": cardholder_id,
            "shipping_address": SIM_PERSON["address"],
        }
        answer = await self.expect("POST", "/v1/cards/physical", body, ok=(201,))
        try:
            return msgspec.json.decode(answer.body, type=CardIssued)
        except msgspec.DecodeError as error:
            raise ApiProblem(f"POST /v1/cards/physical: unexpected answer: {error}") from None

    async def activate(self, card_id: str) -> None:
        await self.expect("POST", f"/v1/cards/{card_id}/activate")

    async def reset_cvc2(self, card_id: str) -> None:
        await self.expect("POST", f"/v1/cards/{card_id}/reset-cvc2")

    async def freeze(self, card_id: str) -> None:
        await self.expect("POST", f"/v1/cards/{card_id}/freeze")

    async def unfreeze(self, card_id: str) -> None:
        await self.expect("POST", f"/v1/cards/{card_id}/unfreeze")
