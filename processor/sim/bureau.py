"""`processor sim bureau`: the card bureau's side of a physical card, through the control API.

A bureau prints a card the programme ordered and ships it, reporting each step
(`POST /v1/cards/{id}/fulfilment`): in production, shipped, delivered. This plays it for one
card, from where the card stands to `--to`, so a sandbox can walk a physical card to its
activation without a real bureau.
"""

from __future__ import annotations

from typing import Final

import msgspec

from processor.sim.api import ApiProblem, ControlApi

STEPS: Final = ("ordered", "in_production", "shipped", "delivered")


class _Card(msgspec.Struct, frozen=True):
    id: str
    fulfilment: str | None = None


async def play_bureau(api: ControlApi, card_id: str, until: str) -> list[str]:
    """Report every step after the card's current one up to `until`; the states reported."""
    answer = await api.expect("GET", f"/v1/cards/{card_id}")
    card = msgspec.json.decode(answer.body, type=_Card)
    if card.fulfilment is None:
        raise ApiProblem(f"card {card_id} is not a physical card")
    reported: list[str] = []
    for step in STEPS[STEPS.index(card.fulfilment) + 1 : STEPS.index(until) + 1]:
        await api.expect("POST", f"/v1/cards/{card_id}/fulfilment", {"status": step})
        reported.append(step)
    return reported


async def run_bureau(base_url: str, token: str, card_id: str, until: str) -> int:
    api = ControlApi(base_url, token)
    try:
        reported = await play_bureau(api, card_id, until)
    except ApiProblem as problem:
        print(f"processor sim bureau: {problem}")
        return 1
    finally:
        await api.close()
    for step in reported:
        print(f"card {card_id}: {step}")
    if not reported:
        print(f"card {card_id}: already {until} or beyond; nothing to report")
    return 0
