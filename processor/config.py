"""The daemon's configuration: a tree of frozen msgspec Structs decoded from TOML.

Unknown keys and bad types fail at start with the key's location (`$.server.port`), because a
typo that silently falls back to a default is how a production processor ends up on the wrong port
or without fsync. Secrets are never in this file: it only names the environment variables.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

from processor import limits
from processor.schemas import readable
from processor.security import mask_card_numbers
from processor.types import FRAME_BYTES_CEILING, MCC_PATTERN, Bitmap, EventType, Framing

Port = Annotated[int, Meta(ge=0, le=65535)]
CpuId = Annotated[int, Meta(ge=0, le=limits.cpu_id_max)]  # as sched_setaffinity numbers them
Mcc = Annotated[str, Meta(pattern=MCC_PATTERN)]
# Durations of holds, retention and retries: ten years at most. Unbounded, a typo's extra
# digits passed the config and then every approval failed (96) to store its hold's expiry.
Seconds = Annotated[int, Meta(gt=0, le=limits.config_seconds_max)]
# The name of an environment variable holding a secret (never the secret: see the module).
EnvironmentVariable = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")]
# Sizes of the ledger's files: 64 TiB at most. LMDB maps the whole size: past what an x86-64
# process can map (128 TiB) the open failed ("Cannot allocate memory") without naming the key;
# past 64 bits inside LMDB (OverflowError); and a huge log size was written out in zeros first.
FileBytes = Annotated[int, Meta(ge=1 << 20, le=1 << 46)]


class ConfigError(Exception):
    """A configuration file or flag that cannot be used; the message names the key."""


ListenerName = Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,32}\Z")]


class ListenerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ISO 8583 port, speaking one peer's dialect (a network's channel).

    The name labels its links in logs and metrics; each listener has its own framing, bitmap,
    header and bad-message rate, because two networks on one processor rarely agree on any.
    """

    name: ListenerName
    host: str = "127.0.0.1"
    port: Port = 8583
    # len2: 2-byte big-endian length of what follows | len2_inclusive: the same, counting its
    # own 2 bytes | ascii4: 4 ASCII digits.
    framing: Framing = "len2"
    # Fixed-length network header between the length prefix and the MTI, echoed back unchanged.
    header_bytes: Annotated[int, Meta(ge=0, le=limits.header_bytes_max)] = 0
    max_frame_bytes: Annotated[int, Meta(ge=64, le=limits.frame_bytes_ceiling)] = (
        limits.frame_bytes_max
    )
    bitmap: Bitmap = "ascii"
    # bad_messages_max bad messages within bad_message_window_seconds close a link: a rate, so
    # a link that sends a malformed message now and then for weeks is never cut.
    # Bounded: the count is a window of that many times (2^63 passed, and every link then
    # failed as it opened, silently).
    bad_messages_max: Annotated[int, Meta(ge=1, le=limits.bad_messages_per_window_max)] = (
        limits.bad_messages_per_window_default
    )
    bad_message_window_seconds: Annotated[float, Meta(gt=0, le=86400)] = (
        limits.bad_message_window_seconds_default
    )
    in_flight_per_link_max: Annotated[int, Meta(ge=1, le=limits.in_flight_per_link_max)] = (
        limits.in_flight_per_link_max
    )
    # Links one peer address may hold on this listener, so one process cannot take every
    # link slot (links_max is shared by all peers).
    links_per_address_max: Annotated[int, Meta(ge=1, le=limits.links_max)] = 256
    # A peer address whose links were closed this many times for what they sent (bad-message
    # rate, framing error, another dialect) within bad_links_window_seconds has its new links
    # refused until the oldest close leaves the window; 0 = never.
    bad_links_per_address_max: Annotated[
        int, Meta(ge=0, le=limits.bad_links_per_address_ceiling)
    ] = 20
    bad_links_window_seconds: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    # A link that sends nothing for this long is closed (networks send 0800 echo tests to keep
    # a link alive; any message counts); 0 = never.
    idle_timeout_seconds: Annotated[float, Meta(ge=0, le=86400)] = 300.0
    # A frame begun and not finished within this is a stalled or hostile peer: closed; 0 = never.
    partial_frame_timeout_seconds: Annotated[float, Meta(ge=0, le=3600)] = 30.0
    # Financial messages (anything but 08xx) on a link that has not signed on (0800, field 70 =
    # 001; 002 signs off) are answered 91 without touching the ledger, advices included: for
    # networks that sign on, so a peer that skips it is told at once and sends them again later.
    sign_on_required: bool = False

    def __post_init__(self) -> None:
        ceiling = FRAME_BYTES_CEILING[self.framing]
        if self.max_frame_bytes > ceiling:
            raise ValueError(
                f"max_frame_bytes {self.max_frame_bytes} exceeds what {self.framing} framing "
                f"can express ({ceiling})"
            )
        if self.header_bytes >= self.max_frame_bytes:
            raise ValueError(f"header_bytes {self.header_bytes} is not below max_frame_bytes")


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Process-wide settings of the ISO 8583 side; the ports are `[[listeners]]`."""

    # Processes serving links (1 = the primary alone). More overlap one worker's durable commit
    # with the others' decoding and encoding; the HTTP port, webhooks and the hold sweeper
    # stay in the primary.
    workers: Annotated[int, Meta(ge=1, le=limits.workers_max)] = 1
    # A request not decided within this of its arrival is answered 91 (issuer unavailable)
    # without touching the ledger: networks stand in after a few seconds, and a late approval
    # is worse than a fast decline. Advices are never dropped: they are recorded however late.
    decision_deadline_seconds: Annotated[float, Meta(gt=0, le=60)] = 1.5
    # A batch takes no more requests than its measured time per request fits in this (commit
    # included, though deciding never gets less time than the commit takes; at least
    # limits.batch_size_min, at most ledger.batch_size_max); 0 = bounded by count alone. A
    # request that arrives during a batch waits for it and then for its own, so this bounds
    # what a greedy peer adds to another link's latency; smaller costs throughput (an fsync
    # per fewer requests). bench/RESULTS.md, 2026-12-06, measures the trade. Saturated with no
    # light link about, batches take up to ledger.batch_size_max (specs/messages.md).
    batch_seconds_max: Annotated[float, Meta(ge=0, le=1)] = 0.005
    # CPUs the daemon runs on (its worker processes too), e.g. [0]; empty: wherever the kernel
    # puts it. With webhooks.delivery_cpus, keeps webhook delivery off the authorisation core.
    cpus: tuple[CpuId, ...] = ()


class HttpConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    # The control API (/v1). Its bearer token is read from this environment variable; the
    # daemon does not start without it (outside --demo) unless control_api = false, which
    # switches /v1 off (it answers 503; metrics and health stay up).
    control_api: bool = True
    api_token_env: EnvironmentVariable = "PROCESSOR_API_TOKEN"
    # Pages allowed to embed the card-details page (/reveal/...) in an iframe: its
    # Content-Security-Policy frame-ancestors, e.g. ["https://app.example.com"]; none: 'none'.
    reveal_frame_ancestors: tuple[Annotated[str, Meta(pattern=r"^https://[^\s;,']+\Z")], ...] = ()


class LedgerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    path: Annotated[str, Meta(min_length=1)] = "var/ledger"
    map_size_bytes: FileBytes = limits.map_size_bytes_default
    # The map doubles by itself when full, up to this ceiling (issue 12: never full by surprise);
    # unset: 64 GiB, or map_size_bytes where that is larger (`map_ceiling_bytes`).
    map_size_max_bytes: FileBytes | None = None
    # fsync: a response leaves only after its batch is on disk (survives power loss).
    # process: committed to the OS page cache only (survives a crash of the daemon, not of the
    # machine); for benchmarks and test rigs where the disk is the bottleneck.
    durability: Literal["fsync", "process"] = "fsync"
    # With fsync and one worker: a batch is durable once its changes are in a write-ahead log
    # of this size (one contiguous write, one flush) and reaches LMDB in a checkpoint at most
    # checkpoint_seconds later, with every batch since the last (processor/ledger/wal.py).
    # 0: every batch commits through LMDB itself (two flushes of scattered pages).
    write_ahead_log_bytes: Annotated[int, Meta(ge=0, le=limits.write_ahead_log_bytes_max)] = 8 << 20
    checkpoint_seconds: Annotated[float, Meta(gt=0, le=1)] = 0.005
    batch_size_max: Annotated[int, Meta(ge=1, le=limits.batch_size_max)] = limits.batch_size_max

    def __post_init__(self) -> None:
        if 0 < self.write_ahead_log_bytes < limits.write_ahead_log_bytes_min:
            raise ValueError(
                f"write_ahead_log_bytes {self.write_ahead_log_bytes} is below "
                f"{limits.write_ahead_log_bytes_min}: too small for a batch; 0 turns the log off"
            )
        if self.map_size_max_bytes is not None and self.map_size_max_bytes < self.map_size_bytes:
            raise ValueError(
                f"map_size_max_bytes {self.map_size_max_bytes} is below map_size_bytes "
                f"{self.map_size_bytes}: the ceiling the map grows to cannot be under its start"
            )

    @property
    def map_ceiling_bytes(self) -> int:
        """What the map may grow to: map_size_max_bytes, by default 64 GiB, never below the
        map's own size."""
        configured = self.map_size_max_bytes
        return max(self.map_size_bytes, configured or limits.map_size_max_bytes_default)


class RetentionConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How long each kind of record is kept (issue 12; the defaults are argued in
    specs/retention.md). A record past its horizon is pruned by the sweep unless something
    still needs it: an answer with an open hold, an event not yet delivered to every endpoint
    (and the answers such events refer to)."""

    enabled: bool = True
    # An authorisation's stored answer (and its hold, RRN index entry): retransmissions,
    # reversals, completions and presentments find their original through it.
    answers_seconds: Seconds = 45 * 86400
    # Events: replayable (`processor webhooks replay`) this long after they are made, and never
    # pruned before every endpoint has them (an event delivered after a longer outage goes
    # soon after its delivery).
    events_seconds: Seconds = 30 * 86400
    # Clearing records applied: a presentment file ingested again is recognised this long.
    clearing_seconds: Seconds = 120 * 86400
    # Idempotency-Key responses of the control API: honoured at least 24 hours.
    idempotency_seconds: Annotated[int, Meta(ge=86400, le=limits.config_seconds_max)] = 2 * 86400

    def __post_init__(self) -> None:
        if self.events_seconds > self.answers_seconds:
            raise ValueError(
                f"events_seconds {self.events_seconds} is above answers_seconds "
                f"{self.answers_seconds}: an event takes its facts from its answer, so answers "
                "must be kept at least as long as events"
            )


class CardVerificationRange(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The card verification keys of one card range (processor/cvc2.py)."""

    bin_prefix: Annotated[str, Meta(pattern=r"^[0-9]{6,11}\Z")]
    # Variables holding double-length 3DES keys in hex. The first computes new cards' CVC2;
    # every one verifies the cards it computed (rotation: put the new key first, keep the old
    # while its cards are in use).
    key_envs: Annotated[
        tuple[EnvironmentVariable, ...],
        Meta(max_length=limits.card_verification_keys_per_range_max),
    ] = ()
    # The built-in, published key: `processor serve --demo` only (refused otherwise).
    development_key: bool = False

    def __post_init__(self) -> None:
        if not self.key_envs and not self.development_key:
            raise ValueError(f"range {self.bin_prefix}: key_envs names no key")
        for variable in self.key_envs:
            if self.key_envs.count(variable) > 1:
                raise ValueError(f"key_envs names {variable!r} more than once")


class SecurityConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pan_key_env: EnvironmentVariable = "PROCESSOR_PAN_KEY"
    # CVC2 of the cards issued through the control API, per card range.
    card_verification_keys: tuple[CardVerificationRange, ...] = ()
    # Consecutive CVC2 mismatches after which a card's card-not-present use is blocked, until
    # the programme resets it (POST /v1/cards/{id}/reset-cvc2); 0 = never blocked.
    cvc2_attempts_max: Annotated[int, Meta(ge=0, le=100)] = 3
    # true: a card-not-present authorisation of a card with a CVC2 must carry it (82
    # `cvc2_missing`), unless a stored credential, merchant-initiated or recurring.
    cvc2_required_card_not_present: bool = False
    # Variables holding the AES-256 keys (64 hex digits) that seal cardholders' personal data:
    # the first seals, every one opens what it sealed (rotation). Required outside --demo.
    personal_data_key_envs: Annotated[
        tuple[EnvironmentVariable, ...], Meta(min_length=1, max_length=4)
    ] = ("PROCESSOR_DATA_KEY",)
    # Key-encryption keys (64 hex digits) of the PAN vault: issued cards' PANs, kept for the
    # cardholder to see through a one-time reveal. The first wraps; each unwraps.
    pan_vault_key_envs: Annotated[
        tuple[EnvironmentVariable, ...], Meta(min_length=1, max_length=4)
    ] = ("PROCESSOR_PAN_VAULT_KEY",)
    # How long a reveal token may wait for its one use.
    reveal_token_seconds: Annotated[int, Meta(ge=10, le=3600)] = 300

    def __post_init__(self) -> None:
        prefixes = [each.bin_prefix for each in self.card_verification_keys]
        for prefix in prefixes:
            if prefixes.count(prefix) > 1:
                raise ValueError(f"card_verification_keys names range {prefix} more than once")


DEMO_BIN_PREFIX: Final = "476173"  # a test BIN: the demo cards' and `--demo` virtual cards'


class CardIssuingConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Virtual cards: PANs drawn at random in this BIN range, Luhn-valid, never reused.

    bin_prefix has no default: issuing in someone else's BIN is worse than not starting, so the
    daemon refuses to start without one (`--demo` uses DEMO_BIN_PREFIX, the demo cards' BIN).
    """

    bin_prefix: Annotated[str, Meta(pattern=r"^([0-9]{6,11})?\Z")] = ""
    pan_length: Annotated[int, Meta(ge=13, le=19)] = 16
    expiry_months: Annotated[int, Meta(ge=1, le=120)] = 36  # from the month of issue
    # A card is issued only to a cardholder whose KYC is approved (POST /v1/cardholders).
    require_cardholder: bool = True

    def __post_init__(self) -> None:
        if self.bin_prefix and self.pan_length - len(self.bin_prefix) < 4:
            raise ValueError("pan_length leaves fewer than 4 digits after bin_prefix")


class ProgrammeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Calendar windows of spend controls (daily, weekly from Monday, monthly, yearly) reset at
    # midnight in this IANA time zone.
    time_zone: Annotated[str, Meta(min_length=1)] = "UTC"
    hold_lifetime_seconds: Seconds = 7 * 24 * 3600
    # Merchants that authorise an estimate and complete much later hold longer.
    hold_lifetime_by_mcc: dict[Mcc, Seconds] = msgspec.field(
        default_factory=lambda: {"7011": 30 * 86400, "7512": 30 * 86400, "3351": 30 * 86400}
    )
    sweep_interval_seconds: Seconds = 60  # how often expired holds are released
    # FX for transactions in another currency than the account's (when the network sends no
    # cardholder billing amount in the account currency); "" = no rates, such requests get 57.
    rates_file: str = ""
    fx_markup_bps: Annotated[int, Meta(ge=0, le=10_000)] = 0
    card_issuing: CardIssuingConfig = CardIssuingConfig()

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"time_zone {self.time_zone!r} is not an IANA time zone") from None

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)


class WebhookEndpoint(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-z0-9_-]{1,40}\Z")]
    url: Annotated[str, Meta(pattern=r"^https?://")]
    # Environment variables holding the whsec_ signing secrets. Each delivery carries one
    # signature per secret, so a secret is rotated by listing the new one beside the old.
    secret_envs: Annotated[
        tuple[EnvironmentVariable, ...],
        Meta(min_length=1, max_length=limits.webhook_secrets_per_endpoint_max),
    ]
    # "*" or exact types, e.g. "authorization.approved" (a misspelt one matched nothing, silently)
    event_types: tuple[EventType | Literal["*"], ...] = ("*",)
    timeout_seconds: Annotated[float, Meta(gt=0, le=60)] = 5.0
    retry_max_age_seconds: Seconds = 86400  # then the event is dead-lettered
    # Requests in flight at once; never two for one account, so per-account order holds.
    in_flight_max: Annotated[int, Meta(ge=1, le=64)] = 16

    def __post_init__(self) -> None:
        for variable in self.secret_envs:
            if self.secret_envs.count(variable) > 1:
                raise ValueError(f"secret_envs names {variable!r} more than once")

    def wants(self, event_type: str) -> bool:
        """Whether the endpoint subscribes to `event_type` (its event_types)."""
        return "*" in self.event_types or event_type in self.event_types


class WebhooksConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    endpoints: tuple[WebhookEndpoint, ...] = ()
    backoff_initial_seconds: Annotated[float, Meta(gt=0, le=3600)] = 1.0
    backoff_max_seconds: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    # CPUs the delivery process runs on, e.g. [1]; empty: the daemon's (server.cpus). Given
    # cores of its own, a delivery burst never takes the core an authorisation waits for.
    delivery_cpus: tuple[CpuId, ...] = ()

    def __post_init__(self) -> None:
        if self.backoff_initial_seconds > self.backoff_max_seconds:
            raise ValueError(
                f"backoff_initial_seconds {self.backoff_initial_seconds} is above "
                f"backoff_max_seconds {self.backoff_max_seconds}"
            )
        # Positions, dead letters and the disabled mark are kept by name: two endpoints of one
        # name would share a position, one passing over what the other delivered.
        names: set[str] = set()
        for index, endpoint in enumerate(self.endpoints):
            if endpoint.name in names:
                raise ValueError(
                    f"endpoints[{index}].name: {endpoint.name!r} is used twice; each endpoint "
                    "needs a name of its own"
                )
            names.add(endpoint.name)


class LogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    level: Literal["debug", "info", "warning", "error"] = "info"


DEFAULT_LISTENERS: Final = (ListenerConfig(name="network"),)


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    server: ServerConfig = ServerConfig()
    listeners: tuple[ListenerConfig, ...] = DEFAULT_LISTENERS
    http: HttpConfig = HttpConfig()
    ledger: LedgerConfig = LedgerConfig()
    security: SecurityConfig = SecurityConfig()
    programme: ProgrammeConfig = ProgrammeConfig()
    log: LogConfig = LogConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    retention: RetentionConfig = RetentionConfig()

    def __post_init__(self) -> None:
        longest_hold = max(
            (self.programme.hold_lifetime_seconds, *self.programme.hold_lifetime_by_mcc.values())
        )
        if self.retention.enabled and self.retention.answers_seconds < longest_hold:
            raise ValueError(
                f"retention: answers_seconds {self.retention.answers_seconds} is below the "
                f"longest hold lifetime ({longest_hold} s, programme.hold_lifetime_seconds or "
                "hold_lifetime_by_mcc): reversals and completions find their hold through "
                "the answer"
            )
        if not self.listeners:
            raise ValueError("listeners: at least one [[listeners]] table is needed")
        names: set[str] = set()
        addresses: set[tuple[str, int]] = set()
        for listener in self.listeners:
            if listener.name in names:
                raise ValueError(f"listeners: name {listener.name!r} is used twice")
            names.add(listener.name)
            address = (listener.host, listener.port)
            if listener.port and address in addresses:
                raise ValueError(f"listeners: {listener.host}:{listener.port} is used twice")
            addresses.add(address)


# Keys of the single `[server]` address before `[[listeners]]` (README, "Listeners").
_MOVED_TO_LISTENERS: Final = (
    "host",
    "port",
    "framing",
    "header_bytes",
    "max_frame_bytes",
    "bitmap",
    "bad_message_budget",
    "in_flight_per_link_max",
)
_MOVED: Final = {
    ("server", key): (
        "each ISO 8583 port is now a [[listeners]] table with its own name, host, port, "
        "framing, bitmap and header_bytes (bad_message_budget became bad_messages_max within "
        "bad_message_window_seconds); see README, 'Listeners'"
    )
    for key in _MOVED_TO_LISTENERS
} | {
    ("ledger", "seed_demo_data"): (
        "demo data is loaded by `processor serve --demo` (into an empty ledger), never otherwise"
    ),
}


# Keys an earlier release took, and what replaces each: an old file still fails (an unknown
# key), and its error says what to write instead.
RENAMED_KEYS = {
    "secret_env": 'secret_envs = ["VARIABLE"], a list (for secret rotation)',
}


def parse_config(text: bytes | str, source: str = "<config>") -> Config:
    try:
        raw = msgspec.toml.decode(text)
    except msgspec.DecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    if isinstance(raw, dict):
        for (table, key), note in _MOVED.items():
            section = raw.get(table)
            if isinstance(section, dict) and key in section:
                raise ConfigError(f"{source}: $.{table}.{key} has moved: {note}")
    try:
        return msgspec.convert(raw, type=Config)
    except msgspec.ValidationError as error:
        message = f"{source}: {readable(error)}{_value_at(raw, str(error))}"
        for old, new in RENAMED_KEYS.items():
            if f"unknown field `{old}`" in str(error):
                message += f"; `{old}` is now {new}"
        raise ConfigError(message) from None


def _value_at(raw: object, error: str) -> str:
    """ " (got 70000)": the value at the path msgspec's error ends with (`$.a[0].b`), when it
    is a scalar; the key alone did not say what was wrong with `port = 70000`."""
    match = re.search(r" - at `\$((?:\.[^.\[`]+|\[\d+\])*)`$", error)
    if match is None:
        return ""
    value = raw
    for name, index in re.findall(r"\.([^.\[]+)|\[(\d+)\]", match.group(1)):
        if name and isinstance(value, dict) and name in value:
            value = value[name]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            return ""
    if isinstance(value, dict | list):
        return ""
    key = re.findall(r"\.([^.\[]+)", match.group(1))[-1:] or [""]
    if isinstance(value, str) and re.search(r"(url|_envs?)$", key[0]):
        # A webhook URL may carry credentials or a token in its path; a variable's name may be
        # a secret pasted in its place: the length says enough.
        return f" (got a string of {len(value)} characters)"
    shown = mask_card_numbers(repr(value))
    return f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"


def load_config(path: str | Path | None) -> Config:
    """Read `path`, or return the embedded defaults when no file is given."""
    if path is None:
        return Config()
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    return parse_config(text, str(path))


def with_overrides(
    config: Config,
    *,
    ledger_path: str | None = None,
    port: int | None = None,
    http_port: int | None = None,
) -> Config:
    """Apply command-line flags that isolate an instance (tests, tools) on top of the file.

    `port` sets the one listener's port; with several listeners only 0 (every listener on a
    free port of its own) is unambiguous.
    """
    listeners, http, ledger = config.listeners, config.http, config.ledger
    if port is not None:
        _port("--port", port)
        if port and len(listeners) > 1:
            raise ConfigError(
                f"--port {port}: the config has {len(listeners)} listeners; set their ports "
                f"there (--port 0 gives each a free port)"
            )
        listeners = tuple(msgspec.structs.replace(each, port=port) for each in listeners)
    if http_port is not None:
        http = msgspec.structs.replace(http, port=_port("--http-port", http_port))
    if ledger_path is not None:
        if not ledger_path:
            raise ConfigError("--ledger: an empty path (the ledger would be the current directory)")
        ledger = msgspec.structs.replace(ledger, path=ledger_path)
    return msgspec.structs.replace(config, listeners=listeners, http=http, ledger=ledger)


def _port(flag: str, value: int) -> int:
    if not 0 <= value <= 65535:
        raise ConfigError(f"{flag}: port {value} is outside 0..65535")
    return value
