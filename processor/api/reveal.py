"""The card-details page: a cardholder's one look at their card's number, expiry and CVC2.

The programme's backend asks for a one-time token (POST /v1/cards/{id}/reveal-token) and
hands the page's address to the cardholder's browser, typically in an iframe of its own app;
the backend itself never sees the details. GET /reveal/{card id}/{token} uses the token (once,
before it expires, for that card only), opens the PAN from the vault, computes the CVC2 afresh
and answers a small page that is never cached, loads nothing, runs no script and may be framed
only by the origins in `http.reveal_frame_ancestors`. Every refusal is the same page, so a
guesser learns nothing about which tokens exist.

A token is looked up in a read transaction first, and only one that matches is taken in a
write (the next batch's): every guess used to be a write command in the authorisation batches,
at about a thousand a second from one client. Refusals are counted
(`processor_reveal_refusals_total{reason}`) and logged within a budget; a client address
refused `limits.reveal_refusals_per_minute_max` times within a minute is refused (429) without
reading the ledger until its oldest refusal is a minute old.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import lmdb
from aiohttp import web

from processor import limits
from processor.api.commands import Revealed, take_reveal_token
from processor.api.port import Processor
from processor.bad_peers import BadPeers
from processor.cvc2 import compute_cvc2
from processor.ledger.store import LedgerError
from processor.log_budget import LogBudget
from processor.pan_vault import VaultError

log = logging.getLogger("processor.api")

REVEAL_PATH: Final = "/reveal/{card_id}/{token}"
_STYLE: Final = (
    "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#111}"
    "dl{display:grid;grid-template-columns:auto 1fr;gap:.4rem 1rem}dt{color:#555}"
    "dd{margin:0;font-family:ui-monospace,monospace;font-size:1.2rem;letter-spacing:.08em}"
)


def token_digest(token: str) -> bytes:
    """What the ledger keeps of a token: its SHA-256 (the token is 256 random bits)."""
    return hashlib.sha256(token.encode("ascii", "replace")).digest()


def _headers(frame_ancestors: tuple[str, ...]) -> dict[str, str]:
    ancestors = " ".join(frame_ancestors) if frame_ancestors else "'none'"
    return {
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
            f"form-action 'none'; frame-ancestors {ancestors}"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def _page(title: str, body: str, status: int, frame_ancestors: tuple[str, ...]) -> web.Response:
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return web.Response(
        text=text, status=status, content_type="text/html", headers=_headers(frame_ancestors)
    )


def details_page(
    pan: str, expiry: str, cvc2: str | None, ancestors: tuple[str, ...]
) -> web.Response:
    grouped = " ".join(pan[index : index + 4] for index in range(0, len(pan), 4))
    rows = [("Card number", grouped), ("Valid thru", f"{expiry[2:]}/{expiry[:2]}")]
    if cvc2 is not None:
        rows.append(("CVC2", cvc2))
    items = "".join(
        f'<dt>{name}</dt><dd id="{name.split()[0].lower()}">{html.escape(value)}</dd>'
        for name, value in rows
    )
    body = f'<h1>Your card</h1><dl id="details">{items}</dl>'
    return _page("Your card", body, 200, ancestors)


def refusal_page(ancestors: tuple[str, ...], status: int = 404) -> web.Response:
    body = (
        '<h1 id="refused">This link cannot show a card</h1>'
        "<p>It has expired, was used already, or is not for this card. Ask for a new one.</p>"
    )
    return _page("Link not usable", body, status, ancestors)


def client_of(remote: str | None) -> str:
    """Whom refusals are counted against: the address, or for IPv6 its /64 (one host is
    handed a whole /64, and would otherwise guess from as many addresses as it likes)."""
    if remote is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def reveal_handler(daemon: Processor) -> Callable[[web.Request], Awaitable[web.Response]]:
    refusals = BadPeers(limits.reveal_addresses_remembered_max)
    limit = limits.reveal_refusals_per_minute_max
    budget = LogBudget()

    def refused(address: str, reason: str, ancestors: tuple[str, ...]) -> web.Response:
        now = time.monotonic()
        daemon.metrics.reveal_refusals.labels(reason).inc()
        if reason != "rate_limited":
            refusals.closed(("reveal", address), now, limit)
        left_out = budget.allow(f"reveal_{reason}", now)
        if left_out is None:
            daemon.metrics.log_lines_suppressed.labels(f"reveal_{reason}").inc()
        else:
            log.warning(
                "card details page refused (%s) to %s (%d such lines left out)",
                reason,
                address,
                left_out,
            )
        return refusal_page(ancestors, 429 if reason == "rate_limited" else 404)

    async def reveal(request: web.Request) -> web.Response:
        ancestors = daemon.config.http.reveal_frame_ancestors
        card_id = request.match_info["card_id"][:64]
        try:
            return await _reveal(request, ancestors)
        except Exception:
            # Never the middleware's error path: it would log the address, token included
            # (still valid when the batch failed), and answer without this page's headers.
            log.exception("card details page failed: card %s", card_id)
            return refusal_page(ancestors, 500)

    async def _reveal(request: web.Request, ancestors: tuple[str, ...]) -> web.Response:
        vault = daemon.pan_vault
        card_id, token = request.match_info["card_id"], request.match_info["token"]
        address = client_of(request.remote)
        if refusals.refused(("reveal", address), time.monotonic(), limit, 60.0):
            return refused(address, "rate_limited", ancestors)
        if vault is None or len(token) > 128 or len(card_id) > 64:
            return refused(address, "no_token", ancestors)
        digest = token_digest(token)
        try:
            with daemon.ledger.read() as reader:
                stored = reader.reveal_token(card_id)
            if stored is None or not hmac.compare_digest(stored.digest, digest):
                return refused(address, "no_token", ancestors)
            taken = await daemon.execute(take_reveal_token(card_id, digest))
        except (LedgerError, lmdb.Error) as error:
            log.error("card details page: ledger failed: %s", type(error).__name__)
            return refusal_page(ancestors, 503)
        if not isinstance(taken, Revealed):
            return refused(address, "not_usable", ancestors)
        card = taken.card
        try:
            pan = vault.open(card.card_id, taken.secret)
        except VaultError as error:
            log.error("card details page: %s", error)  # card id and key id, never the PAN
            return refusal_page(ancestors, 503)
        key = None if card.cvc2_key is None else daemon.card_keys.key(card.cvc2_key)
        cvc2 = None if key is None else compute_cvc2(key, pan, card.expiry)
        log.info("card details shown once: card %s", card.card_id)
        return details_page(pan, card.expiry, cvc2, ancestors)

    return reveal
