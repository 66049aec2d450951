"""`processor webhooks status | enable` on a ledger and delivery state written here."""

from __future__ import annotations

from pathlib import Path

import lmdb
import pytest

from processor.config import Config, parse_config
from processor.ledger.records import OutboxRecord
from processor.ledger.store import Ledger
from processor.webhooks.commands import enable, replay, status
from processor.webhooks.state import DeliveryState, Disabled

T0 = 1_795_486_000.0  # 2026-11-24T02:06:40Z
WHY = Disabled(since_ms=int(T0 * 1000), reason="http_410", event_id="evt_0a0b0c0d000000000001")


def configured(tmp_path: Path) -> Config:
    ledger = tmp_path / "ledger"
    return parse_config(
        f'[ledger]\npath = "{ledger}"\n'
        '[[webhooks.endpoints]]\nname = "main"\nurl = "https://hooks.example/"\n'
        'secret_envs = ["HOOK"]\n'
        '[[webhooks.endpoints]]\nname = "other"\nurl = "https://other.example/"\n'
        'secret_envs = ["HOOK"]\n'
    )


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = configured(tmp_path)
    ledger = Ledger(config.ledger.path, durability="process", map_size_bytes=64 << 20)
    with ledger.write() as writer:
        for created in (T0 - 90, T0 - 30):
            writer.append_event(
                OutboxRecord(
                    sequence=writer.next_event_sequence(),
                    type="authorization.approved",
                    created_ms=int(created * 1000),
                    account_id="acct-1",
                )
            )
    ledger.close()
    return config


def state_of(config: Config) -> DeliveryState:
    return DeliveryState(Path(config.ledger.path) / "webhooks")


def test_status_shows_a_disabled_endpoint_with_when_and_why(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_of(config)
    state.disable("main", WHY)
    state.close()
    assert status(config, now=T0) == 0
    assert capsys.readouterr().out.splitlines() == [
        "outbox: 2 events",
        "endpoint main: delivered up to 0, backlog 2, oldest undelivered 90.0s, dead letters 0",
        "  disabled since 2026-11-24T02:06:40Z: http_410 answering evt_0a0b0c0d000000000001; "
        "nothing is delivered to it until `processor webhooks enable main`",
        "endpoint other: delivered up to 0, backlog 2, oldest undelivered 90.0s, dead letters 0",
    ]


def test_status_names_the_first_dead_letters_and_counts_the_rest(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line each: a dead endpoint at 2,000 events/s made a status of 100,000 lines a
    minute."""
    from processor.webhooks.commands import DEAD_LETTERS_LISTED_MAX
    from processor.webhooks.state import DeadLetter

    state = state_of(config)
    for sequence in range(1, DEAD_LETTERS_LISTED_MAX + 6):
        state.bury(
            "main",
            DeadLetter(
                sequence=sequence, event_id="e", attempts=3, last_error="http_500", dead_ms=1
            ),
        )
    state.close()
    assert status(config, now=T0) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(1 for line in out if line.startswith("  dead ")) == DEAD_LETTERS_LISTED_MAX
    assert (
        f"  ... and 5 more dead letters, up to sequence {DEAD_LETTERS_LISTED_MAX + 5} "
        f"(`replay --from {DEAD_LETTERS_LISTED_MAX + 1}` delivers them again)"
    ) in out


def test_enable_clears_it_says_from_where_and_is_idempotent(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    state = state_of(config)
    state.disable("main", WHY)
    state.advance("main", 2)
    state.close()
    assert enable(config, "main") == 0
    assert capsys.readouterr().out == (
        "endpoint main enabled (disabled since 2026-11-24T02:06:40Z: http_410 answering "
        "evt_0a0b0c0d000000000001); delivery resumes from sequence 2\n"
    )
    state = state_of(config)
    assert state.disabled("main") is None
    state.close()
    assert enable(config, "main") == 0
    assert capsys.readouterr().out == "endpoint main is not disabled; nothing to do\n"
    status(config, now=T0)
    assert "disabled since" not in capsys.readouterr().out


def test_enable_names_an_unknown_endpoint(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    assert enable(config, "mian") == 2
    assert capsys.readouterr().err == "processor: no endpoint 'mian' in webhooks.endpoints\n"


def test_state_written_before_endpoints_could_be_disabled_reads_as_none_disabled(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    # The databases of the release before: positions, dead letters, replays, no "disabled".
    path = Path(config.ledger.path) / "webhooks"
    path.mkdir()
    env = lmdb.open(str(path), map_size=64 << 20, max_dbs=4)
    for name in (b"positions", b"dead_letters", b"replays"):
        env.open_db(name, create=True)
    env.close()
    reader = DeliveryState(path, readonly=True)
    assert reader.disabled("main") is None
    reader.close()
    assert status(config, now=T0) == 0
    assert "disabled" not in capsys.readouterr().out
    writer = DeliveryState(path)  # the daemon, read-write, adds the database
    writer.disable("main", WHY)
    assert writer.disabled("main") == WHY
    writer.close()


def test_replay_of_an_event_the_endpoint_does_not_subscribe_to_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accepted, it was sent when the endpoint had passed it and dropped by the walk when it
    had not: refused now, with the setting that decides it named."""
    ledger_path = tmp_path / "ledger"
    config = parse_config(
        f'[ledger]\npath = "{ledger_path}"\n'
        '[[webhooks.endpoints]]\nname = "main"\nurl = "https://hooks.example/"\n'
        'secret_envs = ["HOOK"]\nevent_types = ["authorization.reversed"]\n'
    )
    ledger = Ledger(config.ledger.path, durability="process", map_size_bytes=64 << 20)
    with ledger.write() as writer:
        for kind in ("authorization.approved", "authorization.reversed"):
            writer.append_event(
                OutboxRecord(
                    sequence=writer.next_event_sequence(),
                    type=kind,
                    created_ms=int(T0 * 1000),
                    account_id="acct-1",
                )
            )
    with ledger.read() as reader:
        ledger_id = reader.ledger_id()
    ledger.close()
    approved, reversed_ = (f"evt_{ledger_id}{sequence:012x}" for sequence in (1, 2))
    assert replay(config, "main", None, approved) == 2
    assert capsys.readouterr().err == (
        "processor: endpoint main does not subscribe to authorization.approved events "
        f"(webhooks.endpoints event_types); {approved} is not sent to it\n"
    )
    assert replay(config, "main", None, reversed_) == 0
    state = state_of(config)
    try:
        assert state.take_replays("main") == [(2, "one")]
    finally:
        state.close()


def test_a_delivery_state_that_cannot_be_opened_is_one_line(
    config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only file system (what ext4 remounts to after a disk error): `replay` and
    `enable` printed lmdb's traceback."""
    from processor.cli import main

    state = Path(config.ledger.path) / "webhooks"
    state.mkdir(mode=0o700)
    (state / "data.mdb").mkdir()  # a file LMDB cannot open, as on a read-only mount
    config_file = tmp_path / "webhooks.toml"
    config_file.write_text(
        f'[ledger]\npath = "{config.ledger.path}"\n'
        '[[webhooks.endpoints]]\nname = "main"\nurl = "https://hooks.example/"\n'
        'secret_envs = ["HOOK"]\n'
    )
    for command in (["replay", "--endpoint", "main", "--from", "1"], ["enable", "main"]):
        assert main(["webhooks", *command, "--config", str(config_file)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("processor: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
