"""Named scenarios against the demo cards (processor/data/demo.toml), checked over the wire.

Each scenario sends real ISO 8583 messages and compares field 39 (and, where it matters, other
fields or whole bytes) with what the processor must answer. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from processor.security import mask_pan
from processor.sim.client import WireClient, transmission_datetime
from processor.wire.framing import Prefix

# Demo cards (processor/data/demo.toml).
ACTIVE = "4761739001010010"  # EUR, per-transaction limit 500000, MCC 5933 blocked
LOST = "4761739001010028"
STOLEN = "4761739001010036"
FROZEN = "4761739001010044"
EXPIRED = "4761739001010051"
LOW_BALANCE = "4761739001010069"  # 50.00 EUR
USD_ACCOUNT = "4761739001010077"
UNKNOWN = "4761739001010093"  # Luhn-valid, never loaded


@dataclass
class Row:
    name: str
    sent: str
    expected: str
    received: str

    @property
    def ok(self) -> bool:
        return self.expected == self.received


class Session:
    def __init__(self, client: WireClient) -> None:
        self.client = client
        self._stan = random.randrange(100_000, 900_000)
        self.acquirer = f"{random.randrange(10**5, 10**6)}"

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
    ) -> dict[str, str]:
        fields = {
            "t": mti,
            "2": pan,
            "3": processing_code,
            "4": f"{amount:012d}",
            "7": transmission_datetime(),
            "11": self.next_stan(),
            "18": mcc,
            "22": "051",
            "25": "00",
            "32": self.acquirer,
            "37": f"{random.randrange(10**11, 10**12)}",
            "41": "TERM0001",
            "42": "MERCHANT0000001",
            "43": "DEMO SHOP              BERLIN       DE".ljust(40)[:40],
            "49": currency,
        }
        if expiry is not None:
            fields["14"] = expiry
        return fields


Check = Callable[[Session], Awaitable[Row]]


def _auth_check(name: str, expected: str, pan: str, **kwargs: object) -> Check:
    async def check(session: Session) -> Row:
        fields = session.authorization(pan, **kwargs)  # type: ignore[arg-type]
        _, response = await session.client.exchange(fields)
        received = response.get("39", "--")
        if expected == "00" and received == "00" and "38" not in response:
            received = "00 without approval code"
        sent = f"0100 {mask_pan(pan)} pc {fields['3']} amt {int(fields['4'])} mcc {fields['18']}"
        return Row(name, sent, expected, received)

    return check


async def _echo(session: Session) -> Row:
    stan = session.next_stan()
    _, response = await session.client.exchange(
        {"t": "0800", "7": transmission_datetime(), "11": stan, "70": "301"}
    )
    received = response.get("39", "--") if response.get("11") == stan else "STAN not echoed"
    return Row("echo", "0800 echo test (70=301)", "00", received)


async def _sign_on(session: Session) -> Row:
    _, response = await session.client.exchange(
        {"t": "0800", "7": transmission_datetime(), "11": session.next_stan(), "70": "001"}
    )
    return Row("sign_on", "0800 sign-on (70=001)", "00", response.get("39", "--"))


async def _balance_inquiry(session: Session) -> Row:
    fields = session.authorization(ACTIVE, 0, processing_code="310000", mcc="6011")
    _, response = await session.client.exchange(fields)
    received = response.get("39", "--")
    balances = response.get("54", "")
    if received == "00" and (not balances or len(balances) % 20 != 0):
        received = f"{received} without field 54 balances"
    return Row("balance_inquiry", f"0100 {mask_pan(ACTIVE)} pc 310000", "00", received)


async def _retransmission(session: Session) -> Row:
    fields = session.authorization(ACTIVE, 1234)
    first, response = await session.client.exchange(fields)
    again, _ = await session.client.exchange(fields)
    repeat_fields = dict(fields, t="0101")
    repeat, _ = await session.client.exchange(repeat_fields)
    received = response.get("39", "--")
    if again != first:
        received = "retransmission answered differently"
    elif repeat != first:
        received = "0101 repeat answered differently"
    return Row(
        "retransmission",
        "0100, same 0100 again, then 0101",
        "00 x3 same bytes",
        ("00 x3 same bytes" if received == "00" else received),
    )


async def _duplicate_different(session: Session) -> Row:
    fields = session.authorization(ACTIVE, 1500)
    await session.client.exchange(fields)
    _, response = await session.client.exchange(dict(fields, **{"4": f"{1600:012d}"}))
    return Row(
        "duplicate_different_content",
        "0100 then same STAN, other amount",
        "94",
        response.get("39", "--"),
    )


async def _format_error(session: Session) -> Row:
    fields = session.authorization(ACTIVE)
    del fields["18"]  # MCC is mandatory in an 0100
    _, response = await session.client.exchange(fields)
    return Row("format_error", "0100 without field 18", "30", response.get("39", "--"))


SCENARIOS: dict[str, Check] = {
    "echo": _echo,
    "sign_on": _sign_on,
    "approve": _auth_check("approve", "00", ACTIVE, amount=1000),
    "unknown_card": _auth_check("unknown_card", "14", UNKNOWN),
    "lost_card": _auth_check("lost_card", "41", LOST),
    "stolen_card": _auth_check("stolen_card", "43", STOLEN),
    "frozen_card": _auth_check("frozen_card", "62", FROZEN),
    "expired_card": _auth_check("expired_card", "54", EXPIRED),
    "expiry_mismatch": _auth_check("expiry_mismatch", "54", ACTIVE, expiry="2901"),
    "unsupported_processing_code": _auth_check(
        "unsupported_processing_code", "12", ACTIVE, processing_code="400000"
    ),
    "currency_not_supported": _auth_check(
        "currency_not_supported", "57", USD_ACCOUNT, currency="978"
    ),
    "zero_amount": _auth_check("zero_amount", "13", ACTIVE, amount=0),
    "blocked_mcc": _auth_check("blocked_mcc", "57", ACTIVE, mcc="7995"),
    "blocked_mcc_by_card": _auth_check("blocked_mcc_by_card", "57", ACTIVE, mcc="5933"),
    "over_transaction_limit": _auth_check("over_transaction_limit", "61", ACTIVE, amount=600000),
    "insufficient_funds": _auth_check("insufficient_funds", "51", LOW_BALANCE, amount=10000),
    "balance_inquiry": _balance_inquiry,
    "retransmission": _retransmission,
    "duplicate_different_content": _duplicate_different,
    "format_error": _format_error,
}


async def run_rows(host: str, port: int, names: list[str], framing: Prefix) -> list[Row]:
    client = await WireClient.connect(host, port, framing)
    try:
        session = Session(client)
        rows = []
        for name in names:
            try:
                rows.append(await SCENARIOS[name](session))
            except (TimeoutError, ConnectionError) as error:
                rows.append(Row(name, "-", "answer", f"no answer: {type(error).__name__}"))
        return rows
    finally:
        await client.close()


def run_scenarios(host: str, port: int, names: list[str], *, framing: Prefix = "len2") -> int:
    if names == ["list"]:
        print("\n".join(SCENARIOS))
        return 0
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(f"processor sim: unknown scenario(s) {', '.join(unknown)}; try `processor sim list`")
        return 2
    try:
        rows = asyncio.run(run_rows(host, port, names or list(SCENARIOS), framing))
    except OSError as error:
        print(f"processor sim: cannot reach {host}:{port}: {error.strerror or error}")
        return 2
    width = max(len(row.name) for row in rows)
    sent_width = max(len(row.sent) for row in rows)
    print(
        f"{'scenario':<{width}}  {'sent':<{sent_width}}  {'expected':<16}  {'received':<16}  result"
    )
    for row in rows:
        print(
            f"{row.name:<{width}}  {row.sent:<{sent_width}}  {row.expected:<16}  "
            f"{row.received:<16}  {'ok' if row.ok else 'MISMATCH'}"
        )
    failed = sum(not row.ok for row in rows)
    print(f"{len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0
