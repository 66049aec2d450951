"""Every named limit at its boundary: the limit itself is accepted, one past it is refused.

processor/limits.py names each bound; these tests read the bound from there, so lowering or
raising one without meaning to fails here rather than in production.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from processor import limits
from processor.config import ConfigError, parse_config
from processor.ledger.load import AccountEntry
from processor.ledger.records import CardState
from processor.lifecycle import new_approval_code
from processor.sim.load import LoadSpec, _validate


def accepted(text: str) -> bool:
    try:
        parse_config(text)
    except ConfigError:
        return False
    return True


LISTENER = "[[listeners]]\nname = 'n'\n"


@pytest.mark.parametrize(
    ("template", "limit"),
    [
        (LISTENER + "max_frame_bytes = {}\n", limits.frame_bytes_ceiling),
        (LISTENER + "header_bytes = {}\n", limits.header_bytes_max),
        (LISTENER + "in_flight_per_link_max = {}\n", limits.in_flight_per_link_max),
        ("[server]\nworkers = {}\n", limits.workers_max),
        ("[ledger]\nbatch_size_max = {}\n", limits.batch_size_max),
    ],
)
def test_config_bounds(template: str, limit: int) -> None:
    assert accepted(template.format(limit))
    assert not accepted(template.format(limit + 1))


def test_webhook_secrets_per_endpoint() -> None:
    def endpoint(count: int) -> str:
        names = ", ".join(f'"S{index}"' for index in range(count))
        return (
            "[[webhooks.endpoints]]\nname = 'e'\nurl = 'http://127.0.0.1:9/'\n"
            f"secret_envs = [{names}]\n"
        )

    assert accepted(endpoint(limits.webhook_secrets_per_endpoint_max))
    assert not accepted(endpoint(limits.webhook_secrets_per_endpoint_max + 1))


def test_frame_default_is_the_listener_default_and_within_the_ceiling() -> None:
    listener = parse_config(LISTENER).listeners[0]
    assert listener.max_frame_bytes == limits.frame_bytes_max <= limits.frame_bytes_ceiling
    assert listener.bad_messages_max == limits.bad_messages_per_window_default
    assert listener.bad_message_window_seconds == limits.bad_message_window_seconds_default


def test_account_id_length() -> None:
    def entry(length: int) -> dict[str, object]:
        return {"id": "a" * length, "currency": "EUR", "balance": 0}

    assert msgspec.convert(entry(limits.account_id_bytes_max), AccountEntry)
    with pytest.raises(msgspec.ValidationError, match=r"\$\.id"):
        msgspec.convert(entry(limits.account_id_bytes_max + 1), AccountEntry)


@pytest.mark.parametrize(
    ("field", "limit", "others"),
    [
        ("rate", limits.sim_rate_per_second_max, {"duration": 1.0, "connections": 1}),
        ("duration", limits.sim_duration_seconds_max, {"rate": 1.0, "connections": 1}),
        ("connections", limits.sim_connections_max, {"rate": 1.0, "duration": 1.0}),
    ],
)
def test_simulator_load_bounds(field: str, limit: float, others: dict[str, float]) -> None:
    def spec(value: float) -> LoadSpec:
        return LoadSpec(host="127.0.0.1", port=1, **{field: value}, **others)  # type: ignore[arg-type]

    _validate(spec(limit))
    with pytest.raises(ValueError, match=f"--{field}"):
        _validate(spec(limit + 1))


def test_approval_code_draws() -> None:
    # Draws that hit taken codes: the last allowed draw may still find a free one...
    taken = CardState(approval_day=1, approval_codes=[5])
    draws = iter([5] * (limits.approval_code_draws_max - 1) + [6])
    assert new_approval_code(taken, 1, lambda _: next(draws)) == "000006"
    # ...one more and it is a bug (a broken random source), not a code to issue.
    taken = CardState(approval_day=1, approval_codes=[5])
    with pytest.raises(AssertionError, match=f"{limits.approval_code_draws_max} approval codes"):
        new_approval_code(taken, 1, lambda _: 5)


def test_approval_codes_remembered() -> None:
    state = CardState(
        approval_day=1, approval_codes=list(range(limits.approval_codes_remembered_max - 1))
    )
    new_approval_code(state, 1, lambda _: 999_999)  # the last one remembered
    assert len(state.approval_codes) == limits.approval_codes_remembered_max
    new_approval_code(state, 1, lambda _: 999_998)  # issued, no longer remembered
    assert len(state.approval_codes) == limits.approval_codes_remembered_max
    assert 999_998 not in state.approval_codes


def test_links_beyond_the_limit_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.protocol.test_link_protocol import FakeTransport, make_daemon, new_link

    monkeypatch.setattr(limits, "links_max", 2)
    daemon = make_daemon(tmp_path)
    transports = [FakeTransport() for _ in range(3)]
    for transport in transports:
        new_link(daemon).connection_made(transport)  # type: ignore[arg-type]
    assert [t.closed for t in transports] == [False, False, True]
    closed = daemon.metrics.links_closed.labels("network", "over_capacity")._value.get()
    assert closed == 1 and len(daemon.links) == 2
    daemon.ledger.close()


def test_commands_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.protocol.test_link_protocol import make_daemon

    monkeypatch.setattr(limits, "commands_per_batch_max", 2)
    daemon = make_daemon(tmp_path)
    transactions: list[object] = []  # the writers themselves: ids of freed ones repeat

    def command(writer: object, now_ms: int) -> int:
        transactions.append(writer)
        return len(transactions)

    async def main() -> list[object]:
        return await asyncio.gather(*(daemon.execute(command) for _ in range(3)))

    assert asyncio.run(main()) == [1, 2, 3]
    first, second, third = transactions
    assert first is second and second is not third  # two in one transaction, then the third
    daemon.ledger.close()
