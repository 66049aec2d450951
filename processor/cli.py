"""`processor`: serve, ledger, clearing, sim. The CLI only builds a config and calls a module."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from processor.config import Config, ConfigError, load_config, with_overrides

if TYPE_CHECKING:
    from processor.ledger.records import Card
    from processor.ledger.store import Ledger, Reader
    from processor.security import PanHasher


def _common_config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return with_overrides(
        config,
        ledger_path=getattr(args, "ledger", None),
        port=getattr(args, "port", None),
        http_port=getattr(args, "http_port", None),
    )


def _setup_logging(level: str, process: str = "processor") -> None:
    from processor.logs import setup_logging

    # JSON lines on stderr; the "processor: ..." stdout lines are not logs.
    setup_logging(level, process)


def cmd_serve(args: argparse.Namespace) -> int:
    from processor.app import run
    from processor.ledger.store import LedgerError
    from processor.server.daemon import StartupError
    from processor.server.workers import WorkerError

    config = _common_config(args)
    _setup_logging(config.log.level, "primary")
    try:
        return run(config, demo=args.demo)
    except (StartupError, LedgerError, WorkerError) as error:
        # Whatever keeps it from starting, in one line (no traceback): exit code 2.
        print(f"processor: {error}", file=sys.stderr)
        return 2


def _writable_ledger(config: Config) -> tuple[Ledger, PanHasher]:
    """The ledger and PAN hasher a tool writes with (no demo seeding; the PAN key checked)."""
    from processor.app import open_ledger
    from processor.development_keys import is_published
    from processor.security import (
        hasher_from_environment,
        key_from_environment,
        pan_key_weakness,
    )

    variable = config.security.pan_key_env
    key = key_from_environment(variable)
    hasher = hasher_from_environment(variable)
    weakness = pan_key_weakness(variable, key)
    if weakness is not None:
        # Only a --demo ledger, bound to the development key already, is written without a
        # secret (unset, or the published key): on any other, the tool would bind a new
        # ledger to a guessable key (and the daemon, started with the real key, refuses it).
        demo_key = hasher.insecure or is_published(key)
        if not demo_key or not _bound_to(config, hasher.fingerprint):
            raise ConfigError(
                f"{weakness}; only a --demo ledger, made with the development key, takes a "
                "tool without one"
            )
        logging.warning("%s: using the insecure development PAN key", variable)
    return open_ledger(config, hasher), hasher


def _bound_to(config: Config, fingerprint: str) -> bool:
    """Whether the configured ledger exists and its cards were keyed with this PAN key."""
    from processor.ledger.store import Ledger, LedgerError, ledger_exists

    if not ledger_exists(config.ledger.path):
        return False
    try:
        ledger = Ledger(config.ledger.path, readonly=True)
    except LedgerError:
        return False
    try:
        return ledger.pan_key_fingerprint() == fingerprint
    finally:
        ledger.close()


def cmd_ledger_load(args: argparse.Namespace) -> int:
    from processor.ledger.load import apply_load_file, read_load_file

    config = _common_config(args)
    _setup_logging(config.log.level)
    data = read_load_file(args.file)
    ledger, hasher = _writable_ledger(config)
    try:
        summary = apply_load_file(ledger, data, hasher, args.file)
    finally:
        ledger.close()
    print(
        f"loaded {args.file}: accounts {summary.accounts_created} created, "
        f"{summary.accounts_updated} updated; cards {summary.cards_created} created, "
        f"{summary.cards_updated} updated"
    )
    return 0


def cmd_ledger_migrate(args: argparse.Namespace) -> int:
    from processor.ledger.store import SCHEMA_VERSION, Ledger

    config = _common_config(args)
    if _no_ledger(config):
        return 1
    # Opening for writing migrates (the daemon does the same at start, with a log line).
    ledger = Ledger(
        config.ledger.path,
        map_size_bytes=config.ledger.map_size_bytes,
        map_size_max_bytes=config.ledger.map_ceiling_bytes,  # room a migration may need
    )
    migrated_from = ledger.migrated_from
    ledger.close()
    schema = SCHEMA_VERSION.decode()
    if migrated_from is None:
        print(f"ledger {config.ledger.path}: schema {schema}, nothing to migrate")
    else:
        print(
            f"ledger {config.ledger.path}: migrated from schema "
            f"{migrated_from.decode()} to {schema}"
        )
    return 0


@contextmanager
def _read_only(config: Config) -> Iterator[Ledger]:
    """The configured ledger opened read-only (a daemon may be serving it), closed after."""
    from processor.ledger.store import Ledger

    ledger = Ledger(config.ledger.path, map_size_bytes=config.ledger.map_size_bytes, readonly=True)
    try:
        yield ledger
    finally:
        ledger.close()


def cmd_ledger_backup(args: argparse.Namespace) -> int:
    config = _common_config(args)
    if _no_ledger(config):
        return 1
    with _read_only(config) as ledger:
        unreplayed = ledger.unreplayed
    if unreplayed:
        # A dead daemon's answered batches, in its log and not in LMDB: the copy would leave
        # them out, and a restore from it would forget answers given.
        print(
            f"processor: {config.ledger.path}: {unreplayed} answered batches are in its "
            "write-ahead log and not in LMDB (the daemon stopped before a checkpoint); start "
            "the daemon or run `processor ledger migrate` first",
            file=sys.stderr,
        )
        return 1
    target = Path(args.directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        unfinished = target.is_dir() and all(
            entry.name.startswith(".partial-") for entry in target.iterdir()
        )
        print(
            f"processor: {target} exists and is not an empty directory"
            + ("; it holds only an unfinished backup (.partial-*): remove it" * unfinished),
            file=sys.stderr,
        )
        return 1
    # Made in a hidden directory inside the target and moved up once whole, the ledger's file
    # last: a copy that failed half-way (a full disk) stayed in TARGET looking like a backup,
    # and serving or verifying it died of SIGBUS on its truncated file. Inside, not beside:
    # the target may be a mount point (a backup disk) or a link to one.
    made = not target.exists()
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    target.chmod(0o700)  # a copy of card data is the owner's alone, made here or not
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    try:
        copied, last_event = _back_up(config, staging)
        _sync_tree(staging)
        for entry in sorted(staging.iterdir(), key=lambda path: path.name == "data.mdb"):
            entry.rename(target / entry.name)
        staging.rmdir()
        _sync_directory(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(target, ignore_errors=True)
        raise
    print(
        f"backed up {copied} of {config.ledger.path} to {target} (compacted): every change "
        f"up to event {last_event} is in it; restore by serving that directory (--ledger)"
    )
    return 0


def _sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_tree(root: Path) -> None:
    """Every file and directory under `root` on the disk before the copy is named a backup."""
    for directory, _, files in os.walk(root):
        for name in files:
            descriptor = os.open(Path(directory) / name, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _sync_directory(Path(directory))


def _back_up(config: Config, target: Path) -> tuple[str, int]:
    """The ledger (and the delivery state) copied into the empty directory `target`: what was
    copied and the last event in the copy."""
    from processor.ledger.store import Ledger, Writer
    from processor.webhooks.state import DeliveryState, state_path

    copied = "the ledger"
    source_state = state_path(config)
    if (source_state / "data.mdb").exists():
        # The delivery positions, dead letters and replay requests, copied before the ledger:
        # they then name only events the ledger's copy holds, so a restore delivers again
        # what was delivered meanwhile (at least once) and never skips an event.
        (target / "webhooks").mkdir(mode=0o700)
        state = DeliveryState(source_state, readonly=True)
        try:
            state.env.copy(str(target / "webhooks"), compact=True)
        finally:
            state.close()
        copied += " and the webhook delivery state"
    # Read-only: a running daemon goes on writing meanwhile (LMDB readers never block it).
    with _read_only(config) as ledger:
        last_event = ledger.copy_to(target)
    # The copy's own events from here on get an id of their own: the ledger backed up goes on
    # numbering (and delivering) events past `last_event`, which a restore must not repeat.
    # The copy is compacted to what it holds: its map may grow (up to the configured ceiling).
    copy = Ledger(
        target,
        map_size_bytes=config.ledger.map_size_bytes,
        map_size_max_bytes=config.ledger.map_ceiling_bytes,
    )

    def part(writer: Writer) -> None:
        writer.name_events_from(last_event + 1)
        # Restored over the ledger's directory, its log beside it: not this copy's records.
        writer.part_from_the_log()

    try:
        copy.write_growing(part)
    finally:
        copy.close()
    # LMDB's copy makes its file as the umask says (0644, often): the owner's alone.
    for made in (target / "data.mdb", target / "webhooks" / "data.mdb"):
        if made.exists():
            made.chmod(0o600)
    return copied, last_event


def cmd_ledger_stats(args: argparse.Namespace) -> int:
    config = _common_config(args)
    if _no_ledger(config):
        return 1
    with _read_only(config) as ledger:
        found = ledger.stats()
        used, size = ledger.map_usage()
    now_ms = datetime.now(UTC).timestamp() * 1000
    print(f"{'database':<14}{'entries':>12}{'depth':>7}{'pages':>10}{'bytes':>14}  oldest record")
    for each in found:
        age = (
            ""
            if each.oldest_ms is None
            else f"{(now_ms - each.oldest_ms) / 86_400_000:.1f} days ago"
        )
        counts = f"{each.entries:>12}{each.depth:>7}{each.pages:>10}{each.bytes:>14}"
        print(f"{each.name:<14}{counts}  {age}")
    print(f"file pages in use: {used} bytes of a {size}-byte map")
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from processor.ledger.verify import verify

    config = _common_config(args)
    if _no_ledger(config):
        return 1
    with _read_only(config) as ledger, ledger.read() as reader:
        found = verify(reader)
        unreplayed = ledger.unreplayed
    if unreplayed:
        # A dead daemon's answered batches, in its log and not in LMDB: this view leaves them
        # out, and "verified" would vouch for a ledger that forgets answers given.
        print(
            f"processor: ledger {config.ledger.path}: {unreplayed} answered batches are in its "
            "write-ahead log and not in LMDB, so not verified; start the daemon or run "
            "`processor ledger migrate`, then verify again",
            file=sys.stderr,
        )
        return 1
    counts = (
        f"{found.accounts} accounts, {found.cards} cards, {found.holds} holds "
        f"({found.open_holds} open), "
        f"{found.answers} answers, {found.events} events"
    )
    if not found.problems_total:
        print(f"ledger {config.ledger.path}: verified: {counts}")
        return 0
    for problem in found.problems:
        print(f"processor: {problem}", file=sys.stderr)
    left = found.problems_total - len(found.problems)
    print(
        f"processor: ledger {config.ledger.path}: {found.problems_total} problems"
        + (f" ({left} not listed)" if left else "")
        + f" in {counts}",
        file=sys.stderr,
    )
    return 1


def _no_ledger(config: Config) -> bool:
    """True (and said on stderr) when there is no ledger where the config points."""
    from processor.ledger.store import ledger_exists

    if ledger_exists(config.ledger.path):
        return False
    print(f"processor: no ledger at {config.ledger.path}", file=sys.stderr)
    return True


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from processor.ledger.report import (
        describe_account,
        describe_controls,
        describe_history,
    )
    from processor.security import hasher_from_environment, mask_card_numbers

    config = _common_config(args)
    pan = None
    if args.account is None and args.card is None:
        pan = _pan_from(args)
        if pan is None:
            return 2
    if _no_ledger(config):
        return 1
    now = datetime.now(UTC)
    with _read_only(config) as ledger, ledger.read() as reader:
        print(f"programme controls {describe_controls(reader.programme_controls())}")
        if args.account is not None:
            account = reader.account(args.account)
            if account is None:
                # What was typed is quoted: a card number typed here is not printed in clear.
                print(
                    f"processor: no account {mask_card_numbers(repr(args.account))}",
                    file=sys.stderr,
                )
                return 1
            print("\n".join(describe_account(reader, account, now)))
            for held_card in reader.account_cards(account.id):
                print("\n".join(describe_history(reader, held_card)))
            return 0
        if args.card is not None:
            found = reader.card_by_id(args.card)
            if found is None:
                print(f"processor: no card {mask_card_numbers(repr(args.card))}", file=sys.stderr)
                return 1
            return _show_card(reader, found[1], now)
        assert pan is not None  # read before the ledger was opened
        hasher = hasher_from_environment(config.security.pan_key_env)
        bound = ledger.pan_key_fingerprint()
        if bound is not None and bound != hasher.fingerprint:
            print(
                f"processor: this ledger's cards were keyed with another PAN key; set "
                f"{config.security.pan_key_env} to the key the ledger was built with",
                file=sys.stderr,
            )
            return 1
        card = reader.card(hasher.card_key(pan))
        if card is None:
            print("processor: no card with that PAN", file=sys.stderr)
            return 1
        return _show_card(reader, card, now)


def _pan_from(args: argparse.Namespace) -> str | None:
    """The PAN to look up, from stdin or a named environment variable: never from argv, which
    every user of the machine can read (ps, /proc). None (said on stderr) when unusable."""
    import os

    from processor.security import mask_card_numbers

    if args.pan_argv is not None:
        print(
            "processor: a PAN on the command line is visible to every user of this machine; "
            "pipe it in with --pan-stdin, or name a variable that holds it with --pan-env VAR",
            file=sys.stderr,
        )
        return None
    if args.pan_env is not None:
        pan = os.environ.get(args.pan_env, "").strip()
        where = f"${args.pan_env}"
    else:
        pan = sys.stdin.readline().strip()
        where = "standard input"
    if not (13 <= len(pan) <= 19 and pan.isdigit()):
        # `where` may be a number itself: --pan-e=4761... abbreviates --pan-env.
        shown = mask_card_numbers(where)
        print(f"processor: {shown} does not hold a PAN (13 to 19 digits)", file=sys.stderr)
        return None
    return pan


def _show_card(reader: Reader, card: Card, now: datetime) -> int:
    from processor.ledger.report import describe_account, describe_card, describe_history

    print(describe_card(card))
    print("\n".join(describe_history(reader, card)))
    account = reader.account(card.account_id)
    if account is not None:
        print("\n".join(describe_account(reader, account, now)))
    return 0


def cmd_clearing_ingest(args: argparse.Namespace) -> int:
    from processor.clearing import ClearingError, describe_summary, ingest_path

    config = _common_config(args)
    _setup_logging(config.log.level)
    if _no_ledger(config):
        return 1
    ledger, hasher = _writable_ledger(config)
    try:
        summary = ingest_path(ledger, args.file, hasher, lambda: datetime.now(UTC))
    except ClearingError as error:
        print(f"processor: {error}", file=sys.stderr)
        return 1
    finally:
        ledger.close()
    print("\n".join(describe_summary(args.file, summary)))
    return 0


def cmd_events_list(args: argparse.Namespace) -> int:
    import msgspec

    from processor.events import render

    config = _common_config(args)
    if _no_ledger(config):
        return 1
    with _read_only(config) as ledger, ledger.read() as reader:
        ids = reader.event_ids()
        for record in reader.outbox(args.first, args.limit):
            event = render(record, ids.prefix(record.sequence))
            sys.stdout.write(msgspec.json.encode(event).decode() + "\n")
    return 0


def cmd_webhooks_status(args: argparse.Namespace) -> int:
    from processor.webhooks.commands import status

    config = _common_config(args)
    if _no_ledger(config):
        return 1
    return status(config, datetime.now(UTC).timestamp())


def cmd_webhooks_replay(args: argparse.Namespace) -> int:
    from processor.webhooks.commands import replay

    config = _common_config(args)
    if _no_ledger(config):
        return 1
    return replay(config, args.endpoint, args.first, args.event)


def cmd_webhooks_enable(args: argparse.Namespace) -> int:
    from processor.webhooks.commands import enable

    config = _common_config(args)
    if _no_ledger(config):
        return 1
    return enable(config, args.endpoint)


def cmd_webhooks_listen(args: argparse.Namespace) -> int:
    from processor.webhooks.commands import listen

    return listen(args.host, args.port, args.secret_envs)


def cmd_sim(args: argparse.Namespace) -> int:
    import os

    from processor.sim.scenarios import run_scenarios

    token = ""
    if args.api is not None:
        token = os.environ.get(args.api_token_env, "")
        if not token:
            print(
                f"processor sim: --api needs the control API token in ${args.api_token_env}",
                file=sys.stderr,
            )
            return 2
    return run_scenarios(
        args.host,
        args.port,
        args.scenarios,
        framing=args.framing,
        api_url=args.api,
        api_token=token,
        run_seconds=args.deadline,
    )


def cmd_sim_load(args: argparse.Namespace) -> int:
    from processor.security import mask_card_numbers
    from processor.sim.load import LoadSpec, run_load

    pan = LoadSpec.pan
    if args.pan_env is not None:
        pan = os.environ.get(args.pan_env, "")
        if not pan.isdigit():
            variable = mask_card_numbers(args.pan_env)
            print(f"processor: {variable} holds no card number", file=sys.stderr)
            return 2
    spec = LoadSpec(
        host=args.host,
        port=args.port,
        rate=args.rate,
        duration=args.duration,
        connections=args.connections,
        framing=args.framing,
        pan=pan,
        amount=args.amount,
        json_out=args.json,
        message=args.message,
    )
    return run_load(spec)


def build_parser() -> argparse.ArgumentParser:
    from processor import __version__

    parser = _Parser(
        prog="processor",
        description="An issuer-side card authorisation processor: ISO 8583 links in, decisions "
        "against an LMDB ledger, signed webhooks out, a control API on the HTTP port.",
        epilog="Try it: `processor serve --demo`, then `processor sim` in another shell. "
        "In production: set PROCESSOR_PAN_KEY, PROCESSOR_API_TOKEN, PROCESSOR_DATA_KEY and "
        "PROCESSOR_PAN_VAULT_KEY in the environment, and in a config (`processor serve --config "
        "FILE`) programme.card_issuing.bin_prefix and a card verification key for it "
        "(README.md). "
        "`processor COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"processor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file (default: embedded defaults)")

    def ledger_command(
        parent: argparse._SubParsersAction[_Parser], name: str, help: str
    ) -> argparse.ArgumentParser:
        """A subcommand working on a ledger: --config and --ledger, like every tool."""
        command = parent.add_parser(name, help=help)
        config_flag(command)
        command.add_argument("--ledger", help="LMDB directory (overrides ledger.path)")
        return command

    serve = sub.add_parser(
        "serve",
        help="run the authorisation daemon",
        description="Run the daemon until SIGTERM or Ctrl-C: ISO 8583 listeners, the HTTP port "
        "(control API, /metrics, /healthz, /readyz) and webhook delivery. Exit codes: 0 stopped, "
        "2 could not start (one line on stderr says why), 70 stopped after an internal error.",
    )
    config_flag(serve)
    serve.add_argument("--ledger", help="LMDB directory (overrides ledger.path)")
    serve.add_argument("--port", type=int, help="ISO 8583 port; 0 picks a free one")
    serve.add_argument("--http-port", type=int, help="HTTP port; 0 picks a free one")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="try it out: demo cards into an empty ledger, the development PAN key and a "
        "made-up control API token when none is set, virtual cards in a test BIN. Without it "
        "the daemon needs PROCESSOR_PAN_KEY, PROCESSOR_API_TOKEN, PROCESSOR_DATA_KEY, "
        "PROCESSOR_PAN_VAULT_KEY, programme.card_issuing.bin_prefix and a card verification key "
        "for it (the error names each one missing)",
    )
    serve.set_defaults(func=cmd_serve)

    ledger = sub.add_parser("ledger", help="load or inspect the ledger")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    load = ledger_command(ledger_sub, "load", "upsert accounts and cards from a TOML file")
    load.add_argument("file")
    load.set_defaults(func=cmd_ledger_load)
    show = ledger_command(ledger_sub, "show", "print balances, holds and card state")
    which = show.add_mutually_exclusive_group(required=True)
    which.add_argument("--account", metavar="ID", help="an account, by id")
    which.add_argument("--card", metavar="ID", help="a card, by card id (card_...)")
    which.add_argument(
        "--pan-stdin", action="store_true", help="a card, by the PAN read from standard input"
    )
    which.add_argument(
        "--pan-env", metavar="VAR", help="a card, by the PAN in environment variable VAR"
    )
    # Refused with an explanation: argv is readable by every user of the machine.
    which.add_argument("--pan", dest="pan_argv", help=argparse.SUPPRESS)
    show.set_defaults(func=cmd_ledger_show)
    migrate = ledger_command(
        ledger_sub, "migrate", "bring a ledger written by an older release to this schema"
    )
    migrate.set_defaults(func=cmd_ledger_migrate)
    backup = ledger_command(
        ledger_sub,
        "backup",
        "a consistent, compacted copy of the ledger (and the webhook delivery state) into an "
        "empty directory, while the daemon serves",
    )
    backup.add_argument("directory")
    backup.set_defaults(func=cmd_ledger_backup)
    check = ledger_command(
        ledger_sub, "verify", "check the ledger's invariants (balances, holds, events)"
    )
    check.set_defaults(func=cmd_ledger_verify)
    stats = ledger_command(
        ledger_sub, "stats", "per database: records, depth, pages, bytes, oldest record's age"
    )
    stats.set_defaults(func=cmd_ledger_stats)

    clearing = sub.add_parser("clearing", help="apply clearing (presentment) files")
    clearing_sub = clearing.add_subparsers(dest="clearing_command", required=True)
    ingest = ledger_command(
        clearing_sub, "ingest", "apply a JSON Lines presentment file (specs/clearing.md)"
    )
    ingest.add_argument("file")
    ingest.set_defaults(func=cmd_clearing_ingest)

    events = sub.add_parser("events", help="the outbox: events for the programme")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    listing = ledger_command(events_sub, "list", "print outbox events as JSON lines, in order")
    listing.add_argument("--from", dest="first", type=_positive, default=1, help="first sequence")
    listing.add_argument("--limit", type=_positive, default=1000)
    listing.set_defaults(func=cmd_events_list)

    webhooks = sub.add_parser("webhooks", help="event delivery: status, replay, a local receiver")
    webhooks_sub = webhooks.add_subparsers(dest="webhooks_command", required=True)
    hook_status = ledger_command(
        webhooks_sub,
        "status",
        "per endpoint: delivered position, backlog, oldest age, dead letters, disabled",
    )
    hook_status.set_defaults(func=cmd_webhooks_status)
    hook_replay = ledger_command(webhooks_sub, "replay", "deliver events again (the daemon does)")
    hook_replay.add_argument("--endpoint", required=True)
    what = hook_replay.add_mutually_exclusive_group(required=True)
    what.add_argument("--from", dest="first", type=_positive, help="every event from this sequence")
    what.add_argument("--event", help="one event, by id (a dead letter, say)")
    hook_replay.set_defaults(func=cmd_webhooks_replay)
    hook_enable = ledger_command(
        webhooks_sub, "enable", "deliver again to an endpoint a 410 Gone disabled"
    )
    hook_enable.add_argument("endpoint", metavar="NAME", help="its name in webhooks.endpoints")
    hook_enable.set_defaults(func=cmd_webhooks_enable)
    hook_listen = webhooks_sub.add_parser(
        "listen", help="a local receiver: verify signatures, print events"
    )
    hook_listen.add_argument("--host", default="127.0.0.1")
    hook_listen.add_argument("--port", type=_port_number, required=True)
    hook_listen.add_argument(
        "--secret-env",
        dest="secret_envs",
        action="append",
        required=True,
        help="variable with a whsec_ secret; repeat it to accept any of several (a rotation)",
    )
    hook_listen.set_defaults(func=cmd_webhooks_listen)

    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=_port_number, default=8583)
        p.add_argument("--framing", choices=("len2", "len2_inclusive", "ascii4"), default="len2")

    sim = sub.add_parser(
        "sim",
        help="network simulator: scenarios (default: all), `sim load ...` or `sim bureau ...`",
    )
    target(sim)
    sim.add_argument(
        "--api",
        metavar="URL",
        help="control API base URL, e.g. http://127.0.0.1:8080; without it the scenarios "
        "that need the API are skipped",
    )
    sim.add_argument(
        "--api-token-env",
        default="PROCESSOR_API_TOKEN",
        metavar="VAR",
        help="environment variable holding the API bearer token (default: %(default)s)",
    )
    sim.add_argument(
        "--deadline",
        type=_seconds,
        default=120.0,
        metavar="SECONDS",
        help="bound on the whole run; scenarios not run by then fail (default: %(default)s)",
    )
    sim.add_argument("scenarios", nargs="*", help="scenario names; `list` to list them")
    sim.set_defaults(func=cmd_sim)
    return parser


def build_bureau_parser() -> argparse.ArgumentParser:
    bureau = _Parser(
        prog="processor sim bureau",
        description="play the card bureau: report a physical card's fulfilment through the API",
    )
    bureau.add_argument("--api", required=True, help="control API base URL (127.0.0.1)")
    bureau.add_argument("--api-token-env", default="PROCESSOR_API_TOKEN")
    bureau.add_argument("--card", required=True, help="the card id (card_...)")
    bureau.add_argument(
        "--to", choices=("in_production", "shipped", "delivered"), default="delivered"
    )
    bureau.set_defaults(func=cmd_sim_bureau)
    return bureau


def cmd_sim_bureau(args: argparse.Namespace) -> int:
    import os

    import uvloop

    from processor.sim.bureau import run_bureau

    token = os.environ.get(args.api_token_env, "")
    if not token:
        print(
            f"processor sim bureau: needs the API token in ${args.api_token_env}", file=sys.stderr
        )
        return 2
    return uvloop.run(run_bureau(args.api, token, args.card, args.to))


def build_load_parser() -> argparse.ArgumentParser:
    load = _Parser(
        prog="processor sim load",
        description="open-loop load generator, HDR latency report",
        allow_abbrev=False,  # "--pan 4761..." must not pass as --pan-env, naming a variable
    )
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=_port_number, default=8583)
    load.add_argument("--framing", choices=("len2", "ascii4"), default="len2")
    load.add_argument("--rate", type=float, required=True, help="requests per second, in total")
    load.add_argument("--duration", type=float, required=True, help="seconds")
    load.add_argument("--connections", type=int, default=1)
    load.add_argument(
        "--pan-env",
        metavar="VAR",
        help="the card to authorise against, by the PAN in environment variable VAR (never on "
        "the command line, which every user of the machine can read; default: a demo card)",
    )
    load.add_argument("--amount", type=int, default=100, help="minor units per authorisation")
    load.add_argument("--json", help="also write the report as JSON to this file")
    load.add_argument(
        "--message",
        choices=("auth", "echo"),
        default="auth",
        help="auth: 0100 purchases; echo: 0800 echo tests, a baseline without the ledger",
    )
    load.set_defaults(func=cmd_sim_load)
    return load


class _Parser(argparse.ArgumentParser):
    """argparse's, with its usage errors masked: they quote what they were given ("unrecognized
    arguments: --pan 4761...", an ambiguous abbreviation's value), a card number included."""

    def error(self, message: str) -> NoReturn:
        from processor.security import mask_card_numbers

        super().error(mask_card_numbers(message))


def _port_number(text: str) -> int:
    """A TCP port: a usage error outside 0..65535, not an OverflowError from bind()."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..65535")
    return value


def _seconds(text: str) -> float:
    """A time bound: a usage error for 0, a negative, nan or inf (each bounded nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive, finite number of seconds")
    return value


def _positive(text: str) -> int:
    """An argument that counts or numbers something from 1 (a sequence, a limit): a usage
    error otherwise, not a struct.error from the ledger's 64-bit keys."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{value} is not between 1 and 2^64 - 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "sim" and argv[1] == "load":
        args = build_load_parser().parse_args(argv[2:])
    elif len(argv) >= 2 and argv[0] == "sim" and argv[1] == "bureau":
        args = build_bureau_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("processor: interrupted", file=sys.stderr)
        return 130  # as a shell reports a command ended by SIGINT
    except BrokenPipeError:
        # The reader went away (`processor events list | head`): stop quietly, as Python's
        # documentation advises, with stdout pointed at /dev/null so that the flush at exit
        # does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ConfigError as error:
        from processor.security import mask_card_numbers

        # Its "(got ...)" is masked where it is made, but msgspec's own text quotes an enum
        # value as it was written ("Invalid enum value '4111...'"): masked whole here.
        print(f"processor: config error: {mask_card_numbers(str(error))}", file=sys.stderr)
        return 2
    except Exception as error:  # operating errors of a CLI: one line, no traceback with data
        from processor.ledger.load import LoadError
        from processor.ledger.store import LedgerError
        from processor.security import mask_card_numbers
        from processor.server.workers import WorkerError

        if isinstance(error, LoadError | LedgerError | WorkerError):
            # Errors quote what they were given (an id, an enum value): a card number typed
            # in the wrong column must not be printed in clear.
            print(f"processor: {mask_card_numbers(str(error))}", file=sys.stderr)
            return 1
        import lmdb

        if isinstance(error, lmdb.Error):
            # LMDB's answer (a full disk during a backup, a state directory on a read-only
            # file system): its text names the call or path and the reason, in one line.
            print(f"processor: {mask_card_numbers(str(error))}", file=sys.stderr)
            return 1
        if isinstance(error, OSError):
            # The machine's answer to what the command was asked to do (a directory that
            # cannot be made, a port in use, a host that does not resolve): one line.
            what = error.strerror or str(error) or type(error).__name__
            where = f" ({error.filename})" if error.filename else ""
            print(f"processor: {mask_card_numbers(what + where)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
