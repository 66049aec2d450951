"""Named scenarios against the demo cards (processor/data/demo.toml), checked over the wire.

Each scenario sends real ISO 8583 messages and compares field 39 (and, where it matters, other
fields or whole bytes) with what the processor must answer. Exit status 1 on any mismatch.

The wire shows only field 39; each scenario also names the machine reasons the daemon must
give (`Scenario.reasons`), which the end-to-end tests check in /metrics.

Scenarios are repeatable on the same ledger, any number of times a day: a limit scenario asks
for more than the limit in one request, and a scenario that needs approvals to reach a limit
reverses (0400) every approval it made, which gives the usage back. Whatever a scenario leaves
unreversed, because it stopped half-way (a timeout, a closed link, Ctrl-C) or never meant to
reverse, is reversed after it, over a new link when its own is gone.

Every answer is checked against the wire contract (processor/sim/client.py: MTI, echo set,
approval code), not only field 39; a row is printed as soon as its scenario finishes.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from processor.security import luhn_check_digit, mask_pan
from processor.sim.api import ApiProblem, ControlApi
from processor.sim.client import (
    APPROVED,
    BadAnswer,
    WireClient,
    transmission_datetime,
)
from processor.types import Framing

# Demo cards (processor/data/demo.toml).
ACTIVE = "4761739001010010"  # EUR, per-transaction limit 500000, MCC 5933 blocked
LOST = "4761739001010028"
STOLEN = "4761739001010036"
FROZEN = "4761739001010044"
EXPIRED = "4761739001010051"
LOW_BALANCE = "4761739001010069"  # 50.00 EUR
USD_ACCOUNT = "4761739001010077"
UNKNOWN = "4761739001010093"  # Luhn-valid, never loaded
# Account demo-controls (EUR; weekly limit 500.00 on money transfers across its cards).
DAILY_AMOUNT = "4761739001010101"  # daily amount limit 1 000.00
DAILY_COUNT = "4761739001010119"  # 2 approvals a day
TRAILING_COUNT = "4761739001010127"  # 2 approvals in any 60 s
RESTAURANT_COUNT = "4761739001010135"  # 1 restaurant approval in any 60 s
CHIP_ONLY = "4761739001010143"  # ecommerce, contactless, magstripe, manual, atm_cash off
EEA_ONLY = "4761739001010150"  # allowed_countries = ["eea"]
NOT_GB_US = "4761739001010168"  # blocked_countries = ["GB", "US"]
GROCERIES_TRANSPORT = "4761739001010176"  # allowed categories groceries, transport; MCC 5912
NO_QUASI_CASH = "4761739001010184"  # blocked quasi_cash, digital_goods; MCC 5993
CASH_LIMIT = "4761739001010192"  # cash at most 200.00 a day
PLAIN = "4761739001010200"  # no card controls
SCA = "4761739001010226"  # e-commerce needs strong customer authentication (require_sca)
# freeze_then_swipe registers a new card of this range through the control API each run (a
# fixed card under a fixed key fails with card_exists once retention forgets the key).
API_CARD_RANGE = "4761739009"
API_ACCOUNT = "sim-api"
API_FUND_KEY = "sim-freeze-then-swipe-fund-1"
RUN_SECONDS = 120.0  # the whole run: a daemon that answers nothing cannot hold CI for longer


def merchant_location(name: str, city: str, country: str) -> str:
    """Field 43, 40 characters: name 25, city 13, ISO 3166-1 alpha-2 country 2."""
    return f"{name[:25]:<25}{city[:13]:<13}{country[:2]:<2}"


CITIES = {
    "DE": "BERLIN",
    "FR": "PARIS",
    "NO": "OSLO",
    "GB": "LONDON",
    "US": "NEW YORK",
}


@dataclass
class Row:
    name: str
    sent: str
    expected: str
    received: str
    skipped: str = ""  # why the scenario did not run; a skipped row is not a failure
    # Found once the scenario was over: approvals it left that could not be reversed, answers
    # nobody awaited. Each one fails the row.
    after: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.skipped) or (self.expected == self.received and not self.after)

    @property
    def result(self) -> str:
        if self.skipped:
            return f"skipped ({self.skipped})"
        return "ok" if self.ok else "MISMATCH"


def _identity(fields: dict[str, str]) -> tuple[str, str, str, str]:
    """A transaction's identity as the daemon keys it: class (a repeat is its original's),
    acquirer, STAN, transmission date-time."""
    return (fields["t"][:3], str(int(fields.get("32", "0") or "0")), fields["11"], fields["7"])


def _holds(fields: dict[str, str]) -> bool:
    """Whether an approval of this request holds or posts money (and so needs a reversal)."""
    return fields["t"][:2] in ("01", "02") and not fields.get("3", "").startswith("31")


def describe_request(fields: dict[str, str]) -> str:
    """A request as it may be printed: the PAN masked, no CVC2 (field 48 is left out)."""
    pan = mask_pan(fields["2"]) if "2" in fields else "no PAN"
    return f"{fields['t']} {pan} amt {int(fields.get('4', '0') or '0')} STAN {fields['11']}"


class Session:
    def __init__(
        self,
        client: WireClient,
        api: ControlApi | None = None,
        reconnect: Callable[[], Awaitable[WireClient]] | None = None,
    ) -> None:
        self.client = client
        self.api = api
        self._reconnect = reconnect
        self._stan = random.randrange(100_000, 900_000)
        self.acquirer = f"{random.randrange(10**5, 10**6)}"
        # Requests that hold money and may have been approved: approved ones, and those whose
        # answer never came or could not be trusted (a reversal of a declined original is
        # answered 00 and changes nothing, so reversing those too is safe).
        self.unreversed: dict[tuple[str, str, str, str], dict[str, str]] = {}
        self._approved: set[tuple[str, str, str, str]] = set()  # of those, the ones known to be

    async def exchange(self, fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        """`client.exchange`, remembering what will need a reversal."""
        key = _identity(fields)
        new = _holds(fields) and key not in self.unreversed
        if new:
            self.unreversed[key] = fields
        raw, response = await self.client.exchange(fields)
        if response.get("39") in APPROVED:
            self._approved.add(key)
        elif new:
            del self.unreversed[key]
        return raw, response

    async def send(self, fields: dict[str, str]) -> dict[str, str]:
        return (await self.exchange(fields))[1]

    def next_stan(self) -> str:
        self._stan = (self._stan + 1) % 1_000_000
        return f"{self._stan:06d}"

    def authorization(
        self,
        pan: str,
        amount: int = 1000,
        *,
        processing_code: str = "000000",
        currency: str = "978",
        mcc: str = "5411",
        expiry: str | None = None,
        mti: str = "0100",
        entry_mode: str = "051",
        condition: str = "00",
        country: str | None = "DE",
        additional_data: str | None = None,
    ) -> dict[str, str]:
        """An authorisation; `country` None leaves field 43 (merchant location) out."""
        fields = {
            "t": mti,
            "2": pan,
            "3": processing_code,
            "4": f"{amount:012d}",
            "7": transmission_datetime(),
            "11": self.next_stan(),
            "18": mcc,
            "22": entry_mode,
            "25": condition,
            "32": self.acquirer,
            "37": f"{random.randrange(10**11, 10**12)}",
            "41": "TERM0001",
            "42": "MERCHANT0000001",
            "49": currency,
        }
        if country is not None:
            fields["43"] = merchant_location("DEMO SHOP", CITIES.get(country, "CITY"), country)
        if expiry is not None:
            fields["14"] = expiry
        if additional_data is not None:
            fields["48"] = additional_data
        return fields

    async def reverse(self, original: dict[str, str]) -> str:
        """Field 39 of a full 0400 reversal of `original`, matched through field 90."""
        forwarder = 0
        fields = {
            "t": "0400",
            "2": original["2"],
            "3": original["3"],
            "4": original["4"],
            "7": transmission_datetime(),
            "11": self.next_stan(),
            "32": original["32"],
            "37": original["37"],
            "41": original["41"],
            "42": original["42"],
            "49": original["49"],
            "90": (
                f"{original['t']}{original['11']}{original['7']}"
                f"{int(original['32']):011d}{forwarder:011d}"
            ),
        }
        _, response = await self.client.exchange(fields)
        # Answered: a code other than 00 is the caller's to report, not to reverse again.
        self.unreversed.pop(_identity(original), None)
        self._approved.discard(_identity(original))
        return response.get("39", "--")

    async def settle(self) -> list[str]:
        """Reverse whatever is left unreversed; what could not be, with why (PAN masked)."""
        if not self.unreversed:
            return []
        client, spare = self.client, None
        failed: list[str] = []
        if client.failure is not None:
            if self._reconnect is None:
                failed = [
                    f"{describe_request(f)}: {client.failure}" for f in self.unreversed.values()
                ]
                self.unreversed.clear()
                return failed
            try:
                client = spare = await self._reconnect()
            except OSError as error:
                failed = [
                    f"{describe_request(f)}: no new link: {error.strerror or error}"
                    for f in self.unreversed.values()
                ]
                self.unreversed.clear()
                return failed
        own, self.client = self.client, client
        try:
            for original in list(self.unreversed.values()):
                # An answer nobody awaited would fail this reversal before it is even sent.
                failed += [f"(unexpected) {found}" for found in client.take_unsolicited()]
                try:
                    code = await self.reverse(original)
                except (TimeoutError, ConnectionError, BadAnswer) as error:
                    self.unreversed.pop(_identity(original), None)
                    failed.append(f"{describe_request(original)}: {error}")
                    continue
                # 25 (no original) is right for a request the daemon never got or declined.
                maybe = _identity(original) not in self._approved
                if code != "00" and not (maybe and code == "25"):
                    failed.append(f"{describe_request(original)}: reversal answered {code}")
        finally:
            self.client = own
            if spare is not None:
                await spare.close()
        return failed

    async def balances(self, pan: str) -> dict[str, int]:
        """A balance inquiry's field 54 by amount type (01 ledger, 02 available), signed."""
        fields = self.authorization(pan, 0, processing_code="310000", mcc="6011")
        response = await self.send(fields)
        code, blocks = response.get("39", "--"), response.get("54", "")
        if code != "00" or not blocks or len(blocks) % 20:
            raise BadAnswer(f"balance inquiry answered {code}, field 54 {blocks!r}")
        found = {}
        for at in range(0, len(blocks), 20):
            block = blocks[at : at + 20]
            sign = {"C": 1, "D": -1}.get(block[7])
            if sign is None or not block[8:].isdigit():
                raise BadAnswer(f"balance inquiry: unreadable field 54 block {block!r}")
            found[block[2:4]] = sign * int(block[8:])
        return found

    async def reverse_all(self, approved: list[dict[str, str]]) -> list[str]:
        """Reverse each approval; the problems found, e.g. ["reversal 25"]."""
        problems = []
        for original in approved:
            code = await self.reverse(original)
            if code != "00":
                problems.append(f"reversal {code}")
        return problems


Check = Callable[[Session], Awaitable[Row]]


@dataclass(frozen=True)
class Scenario:
    check: Check
    # Machine reasons the daemon must count for this scenario's requests (not the reversals').
    reasons: tuple[str, ...] = ()
    needs_api: bool = False


def _auth_check(expected: str, reason: str, pan: str, **kwargs: object) -> Scenario:
    async def check(session: Session) -> Row:
        fields = session.authorization(pan, **kwargs)  # type: ignore[arg-type]
        response = await session.send(fields)
        received = response.get("39", "--")
        if expected == "00" and received == "00" and "38" not in response:
            received = "00 without approval code"
        sent = f"0100 {mask_pan(pan)} pc {fields['3']} amt {int(fields['4'])} mcc {fields['18']}"
        return Row("", sent, expected, received)

    return Scenario(check, (reason,))


@dataclass(frozen=True)
class Swipe:
    """One authorisation of a control scenario and the field 39 it must get."""

    pan: str
    expect: str
    reason: str
    amount: int = 1000
    mcc: str = "5411"
    processing_code: str = "000000"
    entry_mode: str = "051"  # chip
    condition: str = "00"
    country: str | None = "DE"
    additional_data: str | None = None  # field 48


def _swipes(sent: str, *swipes: Swipe) -> Scenario:
    """Send the swipes in order, then reverse every approval among them.

    Expected and received are the field 39 values in order, e.g. "00 00 65"; a reversal that is
    not answered 00 is appended to what was received, so it shows as a mismatch.
    """

    async def check(session: Session) -> Row:
        received: list[str] = []
        approved: list[dict[str, str]] = []
        for swipe in swipes:
            fields = session.authorization(
                swipe.pan,
                swipe.amount,
                mcc=swipe.mcc,
                processing_code=swipe.processing_code,
                entry_mode=swipe.entry_mode,
                condition=swipe.condition,
                country=swipe.country,
                additional_data=swipe.additional_data,
            )
            response = await session.send(fields)
            code = response.get("39", "--")
            received.append(code)
            if code in APPROVED:
                approved.append(fields)
        problems = await session.reverse_all(approved)
        expected = " ".join(swipe.expect for swipe in swipes)
        return Row(
            "", f"0100 {mask_pan(swipes[0].pan)} {sent}", expected, " ".join(received + problems)
        )

    return Scenario(check, tuple(dict.fromkeys(swipe.reason for swipe in swipes)))


async def _echo(session: Session) -> Row:
    stan = session.next_stan()
    _, response = await session.client.exchange(
        {"t": "0800", "7": transmission_datetime(), "11": stan, "70": "301"}
    )
    received = response.get("39", "--") if response.get("11") == stan else "STAN not echoed"
    return Row("", "0800 echo test (70=301)", "00", received)


async def _sign_on(session: Session) -> Row:
    _, response = await session.client.exchange(
        {"t": "0800", "7": transmission_datetime(), "11": session.next_stan(), "70": "001"}
    )
    return Row("", "0800 sign-on (70=001)", "00", response.get("39", "--"))


async def _balance_inquiry(session: Session) -> Row:
    fields = session.authorization(ACTIVE, 0, processing_code="310000", mcc="6011")
    response = await session.send(fields)
    received = response.get("39", "--")
    balances = response.get("54", "")
    if received == "00" and (not balances or len(balances) % 20 != 0):
        received = f"{received} without field 54 balances"
    return Row("", f"0100 {mask_pan(ACTIVE)} pc 310000", "00", received)


async def _retransmission(session: Session) -> Row:
    """The same 0100 three times (twice as is, once as an 0101 repeat): the same answer byte for
    byte, and one hold only, which the available balance shows; then reversed."""
    amount = 1234
    before = (await session.balances(ACTIVE))["02"]
    fields = session.authorization(ACTIVE, amount)
    first, response = await session.exchange(fields)
    again, _ = await session.exchange(fields)
    repeat, _ = await session.exchange(dict(fields, t="0101"))
    after = (await session.balances(ACTIVE))["02"]
    reversal = await session.reverse(fields) if response.get("39") in APPROVED else "00"
    restored = (await session.balances(ACTIVE))["02"]
    received = response.get("39", "--")
    if again != first:
        received = "retransmission answered differently"
    elif repeat != first:
        received = "0101 repeat answered differently"
    elif received == "00" and before - after != amount:
        received = f"available moved by {before - after}, not {amount} once"
    elif received == "00":
        received = "00 x3 same bytes, held once"
    if reversal != "00":
        received += f" reversal {reversal}"
    elif restored != before:
        received += f" reversal gave back {restored - after}, not {amount}"
    return Row(
        "",
        "inquiry, 0100, same 0100 again, 0101, inquiry, 0400",
        "00 x3 same bytes, held once",
        received,
    )


async def _duplicate_different(session: Session) -> Row:
    fields = session.authorization(ACTIVE, 1500)
    await session.send(fields)
    response = await session.send(dict(fields, **{"4": f"{1600:012d}"}))
    return Row("", "0100 then same STAN, other amount", "94", response.get("39", "--"))


async def _format_error(session: Session) -> Row:
    fields = session.authorization(ACTIVE)
    del fields["18"]  # MCC is mandatory in an 0100
    response = await session.send(fields)
    return Row("", "0100 without field 18", "30", response.get("39", "--"))


class _ApiRun:
    """What an API scenario does on the link: sends, records each field 39, and reverses its
    approvals at the end, so reruns find the account as they left it."""

    def __init__(self, session: Session) -> None:
        assert session.api is not None, "run_rows skips API scenarios without --api"
        self.session, self.api = session, session.api
        self.received: list[str] = []
        self.approved: list[dict[str, str]] = []

    async def funded_account(self) -> None:
        await self.api.ensure_account(API_ACCOUNT, "EUR")
        # A fixed idempotency key: a rerun replays the first funding.
        await self.api.fund(API_ACCOUNT, 100_000, "processor sim float", API_FUND_KEY)

    async def send(self, fields: dict[str, str]) -> None:
        response = await self.session.send(fields)
        self.received.append(response.get("39", "--"))
        if self.received[-1] in APPROVED:
            self.approved.append(fields)

    async def row(self, sent: str, expected: str, problem: ApiProblem | None) -> Row:
        if problem is not None:
            self.received.append(f"API {problem}")
        problems = await self.session.reverse_all(self.approved)
        return Row("", sent, expected, " ".join(self.received + problems))


def fresh_api_pan() -> str:
    """A Luhn-valid number in API_CARD_RANGE, drawn anew each call."""
    digits = f"{API_CARD_RANGE}{random.randrange(10**5):05d}"
    return digits + luhn_check_digit(digits)


async def _freeze_then_swipe(session: Session) -> Row:
    """The programme registers a card, swipes, freezes, swipes, unfreezes, swipes (00 62 00)."""
    run = _ApiRun(session)
    failed = None
    pan = ""
    try:
        await run.funded_account()
        # A new card each run: nothing depends on what the API still remembers of earlier runs.
        for _ in range(3):  # a number an earlier run registered is taken: draw another
            pan = fresh_api_pan()
            card_id = await run.api.register_new_card(pan, "3012", API_ACCOUNT)
            if card_id is not None:
                break
        else:
            raise ApiProblem(f"POST /v1/cards: 3 numbers in {API_CARD_RANGE}... all card_exists")
        await run.send(session.authorization(pan, 1500))
        await run.api.freeze(card_id)
        await run.send(session.authorization(pan, 1500))
        await run.api.unfreeze(card_id)
        await run.send(session.authorization(pan, 1500))
    except ApiProblem as problem:
        failed = problem
    shown = mask_pan(pan) if pan else f"{API_CARD_RANGE}..."
    sent = f"API card {shown}: 0100, freeze, 0100, unfreeze, 0100"
    return await run.row(sent, "00 62 00", failed)


async def _cvc2_lockout(session: Session) -> Row:
    """The programme issues a virtual card; three wrong CVC2s online (82 each) block its
    card-not-present use (57 even with the right one) until the programme resets it (00)."""
    run = _ApiRun(session)
    failed = None

    def online(pan: str, expiry: str, cvc2: str) -> dict[str, str]:
        fields = session.authorization(
            pan, 1500, entry_mode="812", condition="59", additional_data=f"R92{len(cvc2):02d}{cvc2}"
        )
        fields["14"] = expiry
        return fields

    try:
        await run.funded_account()
        card = await run.api.issue_virtual_card(API_ACCOUNT, await run.api.verified_cardholder())
        if card.cvc2 is None:
            raise ApiProblem("POST /v1/cards/virtual: no cvc2 (no card verification key)")
        wrong = f"{(int(card.cvc2) + 1) % 1000:03d}"
        for _ in range(3):
            await run.send(online(card.pan, card.expiry, wrong))
        await run.send(online(card.pan, card.expiry, card.cvc2))
        await run.api.reset_cvc2(card.id)
        await run.send(online(card.pan, card.expiry, card.cvc2))
    except ApiProblem as problem:
        failed = problem
    sent = "API virtual card: 3 x wrong CVC2, right CVC2, reset, right CVC2"
    return await run.row(sent, "82 82 82 57 00", failed)


async def _physical_card_activation(session: Session) -> Row:
    """The programme orders a physical card: refused (62) until the bureau has shipped it
    and the cardholder has activated it (00)."""
    from processor.sim.bureau import play_bureau

    run = _ApiRun(session)
    failed = None
    try:
        await run.funded_account()
        cardholder_id = await run.api.verified_cardholder()
        card = await run.api.order_physical_card(API_ACCOUNT, cardholder_id)
        await run.send(session.authorization(card.pan, 1500, expiry=card.expiry))
        await play_bureau(run.api, card.id, "shipped")
        await run.api.activate(card.id)
        await run.send(session.authorization(card.pan, 1500, expiry=card.expiry))
    except ApiProblem as problem:
        failed = problem
    return await run.row(
        "API physical card: 0100, bureau ships it, activate, 0100", "62 00", failed
    )


async def _unverified_cardholder(session: Session) -> Row:
    """A card is issued only once the cardholder's KYC is approved: 409 before, 201 after."""
    api = session.api
    assert api is not None, "run_rows skips API scenarios without --api"
    received: list[str] = []
    try:
        await api.ensure_account(API_ACCOUNT, "EUR")
        cardholder_id = await api.new_cardholder()
        body = {"account_id": API_ACCOUNT, "cardholder_id": cardholder_id}
        refused = await api.call("POST", "/v1/cards/virtual", body)
        received.append(f"{refused.status} {refused.error_code or ''}".strip())
        await api.expect("POST", f"/v1/cardholders/{cardholder_id}/kyc", {"status": "approved"})
        issued = await api.call("POST", "/v1/cards/virtual", body)
        received.append(str(issued.status))
    except ApiProblem as problem:
        received.append(f"API {problem}")
    return Row(
        "",
        "API: virtual card for a pending cardholder, approve its KYC, again",
        "409 kyc_not_approved 201",
        " ".join(received),
    )


def _chip_only(entry_mode: str, condition: str, channel: str) -> Scenario:
    return _swipes(
        f"pos {entry_mode}/{condition} ({channel} off)",
        Swipe(
            CHIP_ONLY,
            "57",
            f"channel_blocked:{channel}",
            entry_mode=entry_mode,
            condition=condition,
        ),
    )


SCENARIOS: dict[str, Scenario] = {
    "echo": Scenario(_echo),
    "sign_on": Scenario(_sign_on),
    "approve": _auth_check("00", "approved", ACTIVE, amount=1000),
    "unknown_card": _auth_check("14", "card_not_found", UNKNOWN),
    "lost_card": _auth_check("41", "card_lost", LOST),
    "stolen_card": _auth_check("43", "card_stolen", STOLEN),
    "frozen_card": _auth_check("62", "card_frozen", FROZEN),
    "expired_card": _auth_check("54", "card_expired", EXPIRED),
    "expiry_mismatch": _auth_check("54", "expiry_mismatch", ACTIVE, expiry="2901"),
    "unsupported_processing_code": _auth_check(
        "12", "unsupported_processing_code", ACTIVE, processing_code="400000"
    ),
    "currency_not_supported": _auth_check(
        "57", "currency_not_supported", USD_ACCOUNT, currency="978"
    ),
    # A purchase of zero is an account verification: 85, nothing held.
    "zero_amount": _auth_check("85", "account_verified", ACTIVE, amount=0),
    # Programme level (demo.toml [programme_controls]): gambling is blocked for every card.
    "blocked_mcc": _auth_check("57", "mcc_category_blocked:gambling", ACTIVE, mcc="7995"),
    "blocked_mcc_by_card": _auth_check("57", "mcc_blocked", ACTIVE, mcc="5933"),
    "over_transaction_limit": _auth_check(
        "61", "per_authorization_amount_limit", ACTIVE, amount=600000
    ),
    "insufficient_funds": _auth_check("51", "insufficient_funds", LOW_BALANCE, amount=10000),
    "balance_inquiry": Scenario(_balance_inquiry, ("balance_inquiry",)),
    "retransmission": Scenario(_retransmission, ("approved",)),
    "duplicate_different_content": Scenario(_duplicate_different),
    "format_error": Scenario(_format_error),
    # --- strong customer authentication (PSD2): a soft decline, then the retry with 3-D Secure
    "sca_soft_decline_then_authenticated": _swipes(
        "e-commerce without, then with 3-D Secure (field 48 se 42 = 212)",
        Swipe(SCA, "1A", "sca_required", entry_mode="812", condition="59"),
        Swipe(SCA, "00", "approved", entry_mode="812", condition="59", additional_data="R4203212"),
    ),
    # --- spend controls: channels (57) ---
    "channel_blocked_ecommerce": _chip_only("810", "59", "ecommerce"),
    "channel_blocked_contactless": _chip_only("071", "00", "contactless"),
    "channel_blocked_magstripe": _chip_only("901", "00", "magstripe"),
    "channel_blocked_manual": _chip_only("011", "00", "manual"),
    "channel_blocked_atm_cash": _swipes(
        "pc 010000 mcc 6011 chip (ATM cash off)",
        Swipe(
            CHIP_ONLY,
            "57",
            "channel_blocked:atm_cash",
            processing_code="010000",
            mcc="6011",
        ),
    ),
    "channel_allowed": _swipes("pos 051 chip (on)", Swipe(CHIP_ONLY, "00", "approved")),
    # --- merchant category (57) ---
    "mcc_category_blocked": _swipes(
        "mcc 6051 (quasi_cash blocked)",
        Swipe(NO_QUASI_CASH, "57", "mcc_category_blocked:quasi_cash", mcc="6051"),
    ),
    "mcc_blocked": _swipes(
        "mcc 5993 (blocked MCC)", Swipe(NO_QUASI_CASH, "57", "mcc_blocked", mcc="5993")
    ),
    "mcc_not_blocked": _swipes(
        "mcc 5411 (groceries)", Swipe(NO_QUASI_CASH, "00", "approved", mcc="5411")
    ),
    "mcc_not_allowed": _swipes(
        "mcc 5812 (restaurants, not allowed)",
        Swipe(GROCERIES_TRANSPORT, "57", "mcc_not_allowed", mcc="5812"),
    ),
    "mcc_allowed": _swipes(
        "mcc 4111 (transport), then mcc 5912 (allowed MCC)",
        Swipe(GROCERIES_TRANSPORT, "00", "approved", mcc="4111"),
        Swipe(GROCERIES_TRANSPORT, "00", "approved", mcc="5912"),
    ),
    # --- merchant country, field 43 positions 39-40 (57) ---
    "country_blocked": _swipes(
        "merchant in GB (blocked)", Swipe(NOT_GB_US, "57", "country_blocked:GB", country="GB")
    ),
    "country_not_blocked": _swipes(
        "merchant in FR", Swipe(NOT_GB_US, "00", "approved", country="FR")
    ),
    "country_not_allowed": _swipes(
        "merchant in US (EEA only)",
        Swipe(EEA_ONLY, "57", "country_not_allowed:US", country="US"),
    ),
    "country_unknown": _swipes(
        "no field 43 (EEA only)", Swipe(EEA_ONLY, "57", "country_unknown", country=None)
    ),
    "country_allowed": _swipes(
        "merchant in NO (EEA, not EU)", Swipe(EEA_ONLY, "00", "approved", country="NO")
    ),
    # --- amount limits (61): over the limit in ONE request, whatever the day's history ---
    "daily_amount_limit": _swipes(
        "amt 100001 (daily limit 100000)",
        Swipe(DAILY_AMOUNT, "61", "daily_amount_limit", amount=100_001),
    ),
    "daily_amount_within_limit": _swipes(
        "amt 1000 (daily limit 100000)", Swipe(DAILY_AMOUNT, "00", "approved")
    ),
    "category_amount_limit": _swipes(
        "pc 010000 mcc 6011 amt 20001 (cash 20000 a day)",
        Swipe(
            CASH_LIMIT,
            "61",
            "daily_amount_limit:cash",
            amount=20_001,
            processing_code="010000",
            mcc="6011",
        ),
    ),
    "category_amount_other_spend": _swipes(
        "mcc 5411 amt 30000, then cash 5000 (cash 20000 a day)",
        Swipe(CASH_LIMIT, "00", "approved", amount=30_000),
        Swipe(CASH_LIMIT, "00", "approved", amount=5000, processing_code="010000", mcc="6011"),
    ),
    "account_amount_limit": _swipes(
        "mcc 4829 amt 50001 (account: money transfers 50000 a week)",
        Swipe(PLAIN, "61", "weekly_amount_limit:money_transfer", amount=50_001, mcc="4829"),
    ),
    "account_amount_within_limit": _swipes(
        "mcc 4829 amt 10000 (account: money transfers 50000 a week)",
        Swipe(PLAIN, "00", "approved", amount=10_000, mcc="4829"),
    ),
    # --- count limits (65): reached inside the scenario; the approvals are reversed ---
    "daily_count_limit": _swipes(
        "x3 (2 a day)",
        Swipe(DAILY_COUNT, "00", "approved"),
        Swipe(DAILY_COUNT, "00", "approved"),
        Swipe(DAILY_COUNT, "65", "daily_count_limit"),
    ),
    "trailing_count_limit": _swipes(
        "x3 (2 in any 60 s)",
        Swipe(TRAILING_COUNT, "00", "approved"),
        Swipe(TRAILING_COUNT, "00", "approved"),
        Swipe(TRAILING_COUNT, "65", "trailing_count_limit"),
    ),
    "category_count_limit": _swipes(
        "mcc 5812 x2, then mcc 5411 (1 restaurant in any 60 s)",
        Swipe(RESTAURANT_COUNT, "00", "approved", mcc="5812"),
        Swipe(RESTAURANT_COUNT, "65", "trailing_count_limit:restaurants", mcc="5812"),
        Swipe(RESTAURANT_COUNT, "00", "approved", mcc="5411"),
    ),
    # --- the control API (needs --api) ---
    "freeze_then_swipe": Scenario(_freeze_then_swipe, ("approved", "card_frozen"), needs_api=True),
    "unverified_cardholder": Scenario(_unverified_cardholder, (), needs_api=True),
    "physical_card_activation": Scenario(
        _physical_card_activation, ("card_inactive", "approved"), needs_api=True
    ),
    "cvc2_lockout": Scenario(
        _cvc2_lockout, ("cvc2_mismatch", "cvc2_attempts_exceeded", "approved"), needs_api=True
    ),
}


def _failed_row(name: str, error: BaseException) -> Row:
    if isinstance(error, TimeoutError) and not str(error):
        return Row(name, "-", "answer", "not finished within the run's time bound")
    return Row(name, "-", "answer", f"{type(error).__name__}: {error}")


async def _run_one(session: Session, name: str, scenario: Scenario, deadline: float) -> Row:
    """One scenario, bounded by the run's deadline, then its leftovers reversed."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + max(0.0, deadline - time.monotonic())):
            row = await scenario.check(session)
    except (TimeoutError, ConnectionError, BadAnswer) as error:
        row = _failed_row(name, error)
    except asyncio.CancelledError:
        # Ctrl-C: the reversals still go out (a rerun would fail on the usage they hold) and
        # what could not be reversed is printed before the run stops.
        row = Row(name, "-", "answer", "interrupted")
        row.after = await _leftovers(session)
        row.name = name
        raise _Interrupted(row) from None
    row.after = await _leftovers(session)
    return row


async def _leftovers(session: Session) -> list[str]:
    # Taken first: an answer nobody awaited would otherwise fail the first reversal's exchange.
    found = [f"unexpected: {problem}" for problem in session.client.take_unsolicited()]
    found += [f"not reversed: {problem}" for problem in await session.settle()]
    found += [f"unexpected: {problem}" for problem in session.client.take_unsolicited()]
    return found


class _Interrupted(Exception):
    """The run was cancelled (Ctrl-C) during a scenario; carries that scenario's row."""

    def __init__(self, row: Row) -> None:
        super().__init__(row.name)
        self.row = row


async def run_rows(
    host: str,
    port: int,
    names: list[str],
    framing: Framing,
    api_url: str | None = None,
    api_token: str = "",
    *,
    on_row: Callable[[Row], None] = lambda row: None,
    run_seconds: float = RUN_SECONDS,
) -> list[Row]:
    """Run the scenarios in order; `on_row` gets each row as soon as it is known.

    A dead link fails the scenarios after it at once (with its cause) rather than each after a
    timeout, and the whole run stops at `run_seconds`: the rows not run are failures.
    """
    client = await WireClient.connect(host, port, framing)
    api = ControlApi(api_url, api_token) if api_url else None
    deadline = time.monotonic() + run_seconds

    async def reconnect() -> WireClient:
        return await WireClient.connect(host, port, framing)

    session = Session(client, api, reconnect)
    rows: list[Row] = []
    try:
        for name in names:
            scenario = SCENARIOS[name]
            if scenario.needs_api and api is None:
                row = Row(name, "-", "-", "-", skipped="needs --api")
            elif client.failure is not None:
                row = Row(name, "-", "answer", f"not run: the link is down ({client.failure})")
            elif time.monotonic() >= deadline:
                row = Row(name, "-", "answer", f"not run: the run's {run_seconds:g} s are up")
            else:
                row = await _run_one(session, name, scenario, deadline)
            row.name = name
            rows.append(row)
            on_row(row)
        return rows
    except _Interrupted as interrupted:
        on_row(interrupted.row)
        raise asyncio.CancelledError from None
    finally:
        if api is not None:
            await api.close()
        await client.close()


COLUMNS = (52, 26, 26)  # sent, expected, received: rows are printed before all are known


def _line(name: str, width: int, sent: str, expected: str, received: str, result: str) -> str:
    sent_w, expected_w, received_w = COLUMNS
    return (
        f"{name:<{width}}  {sent:<{sent_w}}  {expected:<{expected_w}}  "
        f"{received:<{received_w}}  {result}"
    )


def print_header(width: int) -> None:
    print(_line("scenario", width, "sent", "expected", "received", "result"), flush=True)


def print_row(row: Row, width: int) -> None:
    print(_line(row.name, width, row.sent, row.expected, row.received, row.result))
    for problem in row.after:
        print(f"{'':<{width}}  {problem}")
    sys.stdout.flush()


def print_summary(rows: list[Row]) -> None:
    failed = sum(not row.ok for row in rows)
    skipped = sum(bool(row.skipped) for row in rows)
    print(f"{len(rows) - failed - skipped} passed, {failed} failed, {skipped} skipped")


def run_scenarios(
    host: str,
    port: int,
    names: list[str],
    *,
    framing: Framing = "len2",
    api_url: str | None = None,
    api_token: str = "",
    run_seconds: float = RUN_SECONDS,
) -> int:
    """Run the named scenarios (all when none); 1 on any mismatch, 2 when nothing could run
    (the processor unreachable, or every scenario skipped), 130 when interrupted.

    Without `api_url` the scenarios that need the control API are shown as skipped and do not
    count as failures; with it, they run and count like any other.
    """
    if names == ["list"]:
        for name, scenario in SCENARIOS.items():
            print(f"{name}  (needs --api)" if scenario.needs_api else name)
        return 0
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(f"processor sim: unknown scenario(s) {', '.join(unknown)}; try `processor sim list`")
        return 2
    names = names or list(SCENARIOS)
    width = max(len("scenario"), *(len(name) for name in names))
    done: list[Row] = []

    def on_row(row: Row) -> None:
        if not done:
            print_header(width)
        done.append(row)
        print_row(row, width)

    try:
        rows = asyncio.run(
            run_rows(
                host,
                port,
                names,
                framing,
                api_url,
                api_token,
                on_row=on_row,
                run_seconds=run_seconds,
            )
        )
    except OSError as error:
        print(f"processor sim: cannot reach {host}:{port}: {error.strerror or error}")
        return 2
    except KeyboardInterrupt:
        print_summary(done)
        print(f"processor sim: interrupted after {len(done)} of {len(names)} scenarios")
        return 130
    print_summary(rows)
    if any(not row.ok for row in rows):
        return 1
    if all(row.skipped for row in rows):
        print("processor sim: every scenario was skipped: nothing was checked")
        return 2
    return 0
