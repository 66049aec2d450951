"""Prometheus metrics of the daemon, in a registry of its own (one per daemon instance).

Labels never carry a PAN, STAN or card id: only MTIs, response codes and fixed reason words.
Label children are resolved once and cached, because `labels()` costs more than `observe()`.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Sequence
from typing import Final, TypeVar

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Families a sum over processes would make meaningless: the primary's own stand for the daemon.
# (Open descriptors against the primary's limit alone: summed, the usual open/max alert read
# (workers + 1) times too high.)
NOT_SUMMED: Final = frozenset(
    {
        "process_start_time_seconds",
        "process_max_fds",
        "process_open_fds",
        "python_info",
        "processor_build",
    }
)
Labelled = TypeVar("Labelled", bound=MetricWrapperBase)
ANSWER_KINDS_CACHED_MAX: Final = 4096  # cached label children of (MTI, code, reason) seen
# Cached label children of the link and bad-message metrics (Metrics.child): their label values
# are listener names, fixed reason words and field numbers, so this is never reached in use.
CHILDREN_CACHED_MAX: Final = 4096

# One sample as a worker process reports it: family, sample name, labels, value.
Sample = tuple[str, str, tuple[tuple[str, str], ...], float]

# The *_created series double the exposition size and no dashboard of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# 50 us, then 100 us steps up to 5 ms (to see 100 us shifts), then coarse to 2.5 s.
LATENCY_BUCKETS_SECONDS = (
    0.00005,
    *(step / 10_000 for step in range(1, 51)),
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMMIT_BUCKETS_SECONDS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.5,
    1.0,
)


# Label values a peer cannot multiply: an MTI this side does not answer counts as "other", and a
# machine reason as its family (`country_not_allowed`, not `country_not_allowed:US`): a peer
# inventing MTIs or merchant countries must not grow the number of series. The full reason is
# in the stored answer, the event and the log.
OTHER_MTI: Final = "other"


def reason_family(reason: str) -> str:
    return reason.partition(":")[0]


class Metrics:
    def __init__(self) -> None:
        from processor import __version__
        from processor.wire.codec import MANDATORY

        self._known_mtis = frozenset(MANDATORY)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # What any Python service exposes: CPU, memory, descriptors, GC, interpreter version.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        Info("processor_build", "The processor's version", registry=r).info(
            {"version": __version__}
        )
        self.requests = Counter(
            "processor_requests",
            "Requests answered, by request MTI, response code (field 39) and machine reason",
            ["mti", "response_code", "reason"],
            registry=r,
        )
        self.latency = Histogram(
            "processor_request_latency_seconds",
            "Frame in to response written, by request MTI",
            ["mti"],
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "processor_commit_batch_size",
            "Requests applied per LMDB write transaction",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "processor_commit_seconds",
            "Decide + apply + durable commit of one batch",
            buckets=COMMIT_BUCKETS_SECONDS,
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "processor_ledger_checkpoint_seconds",
            "Durable LMDB commit of the batches the write-ahead log held (the loop waits)",
            buckets=COMMIT_BUCKETS_SECONDS,
            registry=r,
        )
        # Per listener (its configured name): a bounded label, since only config adds one.
        self.open_links = Gauge(
            "processor_open_links", "Open network links", ["listener"], registry=r
        )
        self.bad_messages = Counter(
            "processor_bad_messages",
            "Bad input: undecodable (dropped), format_error (answered 30), framing (link closed),"
            " zero_length (a frame of length 0, dropped); field: the ISO 8583 field at fault"
            " (t = the MTI), empty when none is known",
            ["listener", "kind", "field"],
            registry=r,
        )
        self.links_closed = Counter(
            "processor_links_closed",
            "Links closed by the processor, by reason",
            ["listener", "reason"],
            registry=r,
        )
        self.ledger_writes_failing = Gauge(
            "processor_ledger_writes_failing",
            "Processes whose last batch could not be written (answered 96: the ledger full at"
            " its ceiling, or a ledger error); /readyz is 503 while any is",
            registry=r,
        )
        self.child_process_up = Gauge(
            "processor_child_process_up",
            "1 while a child process of the daemon serves (worker-N, webhook-delivery): from its"
            " ready report until it exits; 0 while it is down or starting again",
            ["process"],
            registry=r,
        )
        self.child_process_exits = Counter(
            "processor_child_process_exits",
            "Exits of a child process of the daemon other than the stop it was asked for (a"
            " crash, a kill after it hung); each is followed by a restart, at once or after a"
            " rest past the restart budget",
            ["process"],
            registry=r,
        )
        self.http_connections_refused = Counter(
            "processor_http_connections_refused",
            "Connections to the HTTP port accepted and closed at once: no file descriptor left"
            " (open_files_limit, system_open_files_limit)",
            ["reason"],
            registry=r,
        )
        self.reveal_refusals = Counter(
            "processor_reveal_refusals",
            "Card details pages refused: no such token for the card (no_token), a token expired"
            " or a card closed (not_usable), or a client past its refusals a minute"
            " (rate_limited, answered without reading the ledger)",
            ["reason"],
            registry=r,
        )
        self.log_lines_suppressed = Counter(
            "processor_log_lines_suppressed",
            "Warnings a peer caused that were left out of the log (a link's budget per kind)",
            ["kind"],
            registry=r,
        )
        self.internal_errors = Counter(
            "processor_internal_errors",
            "Batches that failed on a bug and were answered 96",
            registry=r,
        )
        self.holds_expired = Counter(
            "processor_holds_expired", "Holds released by the expiry sweeper", registry=r
        )
        self.retention_visited = Counter(
            "processor_retention_visited",
            "Records the retention sweep looked at, by kind of record",
            ["record"],
            registry=r,
        )
        self.retention_pruned = Counter(
            "processor_retention_pruned",
            "Records pruned past their retention horizon, by kind of record",
            ["record"],
            registry=r,
        )
        self.retention_kept = Counter(
            "processor_retention_kept",
            "Records past their horizon kept because something still needs them "
            "(open_hold, undelivered, event_kept, written_now) or unreadable",
            ["record", "reason"],
            registry=r,
        )
        self.retention_step_seconds = Histogram(
            "processor_retention_step_seconds",
            "Time one retention step took inside its write transaction (in a batch's: added "
            "to that batch's latency)",
            buckets=LATENCY_BUCKETS_SECONDS,
            registry=r,
        )
        self.retention_horizon = Gauge(
            "processor_retention_horizon_seconds",
            "How long each kind of record is kept (retention.*_seconds); 0: retention is off",
            ["record"],
            registry=r,
        )
        self.webhook_delivered = Counter(
            "processor_webhook_delivered",
            "Events delivered (2xx), by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.webhook_failures = Counter(
            "processor_webhook_failures",
            "Failed delivery attempts, by endpoint and error",
            ["endpoint", "error"],
            registry=r,
        )
        self.webhook_dead_letters = Counter(
            "processor_webhook_dead_letters",
            "Events given up on after their retry age",
            ["endpoint"],
            registry=r,
        )
        self.webhook_dead_letters_expired = Counter(
            "processor_webhook_dead_letters_expired",
            "Dead letters forgotten past retention.events_seconds (no longer replayable)",
            ["endpoint"],
            registry=r,
        )
        self.webhook_delivery_seconds = Histogram(
            "processor_webhook_delivery_seconds",
            "Commit of an event to its 2xx, by endpoint",
            ["endpoint"],
            # Up to a day: retries back off to 5 minutes and go on for retry_max_age_seconds
            # (a day); past 60 s every delivery read as 60 s in the quantiles.
            buckets=(
                *COMMIT_BUCKETS_SECONDS,
                2.5,
                5.0,
                10.0,
                30.0,
                60.0,
                120.0,
                300.0,
                600.0,
                1800.0,
                3600.0,
                7200.0,
                21600.0,
                86400.0,
            ),
            registry=r,
        )
        self.webhook_endpoint_disabled = Gauge(
            "processor_webhook_endpoint_disabled",
            "1 while an endpoint is disabled (it answered 410 Gone), until enabled again",
            ["endpoint"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "processor_outbox_backlog",
            "Outbox events not yet delivered, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.outbox_oldest_undelivered = Gauge(
            "processor_outbox_oldest_undelivered_seconds",
            "Age of the oldest event not yet delivered, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.ledger_map_used = Gauge(
            "processor_ledger_map_used_bytes", "Bytes of the LMDB map in use", registry=r
        )
        self.ledger_map_size = Gauge(
            "processor_ledger_map_size_bytes", "Size of the LMDB map", registry=r
        )
        self._ledger_databases = _LedgerDatabases()
        r.register(self._ledger_databases)
        self.ledger_map_ceiling = Gauge(
            "processor_ledger_map_ceiling_bytes",
            "What the LMDB map may grow to (ledger.map_size_max_bytes): full there, answers 96",
            registry=r,
        )
        self._answered: dict[tuple[str, str, str], Callable[[float], None]] = {}
        # Label child per MTI label, resolved once. Not through `child()`: this is per answer
        # (every echo and 91 too), and a key of one string measured 0.1 us less than child()'s.
        self._latency: dict[str, Histogram] = {}
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}
        self.workers = WorkerSamples()

    def child(self, metric: Labelled, *values: str) -> Labelled:
        """`metric.labels(*values)`, resolved once: a hostile peer's frames each count a bad
        message and may close a link, and `labels()` (a lock, the values checked and joined)
        was 6 % of the loop's time under bench/run_hostile.py's hostile peer."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            if len(self._children) >= CHILDREN_CACHED_MAX:
                self._children.clear()  # not memory for whatever label values came
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]  # labels() gives the metric's own type

    def answered(self, mti: str, response_code: str, reason: str, latency_seconds: float) -> None:
        self._count(mti, response_code, reason, 1)
        self._latency_child(mti).observe(latency_seconds)

    def answered_batch(
        self, answers: Sequence[tuple[str, str, str]], latencies_seconds: Sequence[float]
    ) -> None:
        """A batch's answers, (MTI, response code, reason) each: one count per kind of answer
        (a batch is mostly one kind), one latency observation per answer."""
        for (mti, response_code, reason), count in Tally(answers).items():
            self._count(mti, response_code, reason, count)
        by_mti: dict[str, list[float]] = {}
        for (mti, _, _), latency_seconds in zip(answers, latencies_seconds, strict=True):
            by_mti.setdefault(mti, []).append(latency_seconds)
        for mti, latencies in by_mti.items():
            self._observe_many(mti, latencies)

    def _observe_many(self, mti: str, latencies_seconds: list[float]) -> None:
        """Histogram.observe for many values: each bucket and the sum incremented once.

        prometheus_client's observe walks the bucket bounds one by one under a lock per value
        (~1.2 us with our 60 buckets); a batch finds each value's bucket by bisection and adds
        the counts. This reads the child's bounds and values, which the library does not
        document: tests/unit/test_metrics_workers.py compares the exposition with observe's.
        """
        child = self._latency_child(mti)
        bounds: list[float] = child._upper_bounds
        counts = Tally(bisect_left(bounds, latency) for latency in latencies_seconds)
        buckets = child._buckets
        for index, count in counts.items():
            buckets[index].inc(count)
        child._sum.inc(sum(latencies_seconds))

    def _count(self, mti: str, response_code: str, reason: str, count: int) -> None:
        key = (mti, response_code, reason)
        increment = self._answered.get(key)
        if increment is None:
            label = mti if mti in self._known_mtis else OTHER_MTI
            child = self.requests.labels(label, response_code, reason_family(reason))
            increment = self._answered[key] = child.inc
            if len(self._answered) > ANSWER_KINDS_CACHED_MAX:
                self._answered.clear()  # invented reasons or MTIs: drop the cache, not memory
                self._answered[key] = increment
        increment(count)

    def _latency_child(self, mti: str) -> Histogram:
        label = mti if mti in self._known_mtis else OTHER_MTI
        child = self._latency.get(label)
        if child is None:
            child = self._latency[label] = self.latency.labels(label)
        return child

    def snapshot(self) -> list[Sample]:
        """This process's samples, for the primary to add to its /metrics (summed there)."""
        return [
            (family.name, sample.name, tuple(sorted(sample.labels.items())), sample.value)
            for family in self.registry.collect()
            if family.name not in NOT_SUMMED
            for sample in family.samples
        ]

    def exposition(self) -> bytes:
        """The Prometheus text of this process plus what the worker processes reported."""
        if not self.workers.reported:
            return generate_latest(self.registry)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged(self.registry, self.workers))
        return generate_latest(merged)

    def count_retention(
        self,
        visited: dict[str, int],
        pruned: dict[str, int],
        kept: dict[tuple[str, str], int],
        seconds: Sequence[float] = (),
    ) -> None:
        for record, count in visited.items():
            self.retention_visited.labels(record).inc(count)
        for record, count in pruned.items():
            self.retention_pruned.labels(record).inc(count)
        for (record, reason), count in kept.items():
            self.retention_kept.labels(record, reason).inc(count)
        for each in seconds:
            self.retention_step_seconds.observe(each)

    def watch_ledger(
        self,
        usage: Callable[[], tuple[int, int]],
        ceiling_bytes: int,
        databases: Callable[[], list[DatabaseSample]] | None = None,
    ) -> None:
        self.ledger_map_used.set_function(lambda: usage()[0])
        self.ledger_map_size.set_function(lambda: usage()[1])
        self.ledger_map_ceiling.set(ceiling_bytes)
        if databases is not None:
            self._ledger_databases.source = databases


class WorkerSamples:
    """The latest samples of each worker process (server.workers > 1), summed into /metrics.

    A worker reports its whole registry every second; counters and histograms are totals since
    it started, so the sum over workers is the daemon's total. When a worker exits its last
    report is kept as retired, so a restarted worker never makes a total go backwards.
    """

    def __init__(self) -> None:
        self._latest: dict[int, list[Sample]] = {}
        self._retired: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        # Per child, gauges the primary computes in its place while it has no report of its
        # own (down, or not yet reporting): the webhook delivery process's backlog.
        self.stand_ins: dict[int, Callable[[], list[Sample]]] = {}

    @property
    def reported(self) -> bool:
        return bool(self._latest or self._retired or self.stand_ins)

    def update(self, worker: int, samples: list[Sample]) -> None:
        self._latest[worker] = samples

    def retire(self, worker: int) -> None:
        for family, name, labels, value in self._latest.pop(worker, []):
            if not _is_gauge_sample(family, name):  # its links and the like died with it
                key = (family, name, labels)
                self._retired[key] = self._retired.get(key, 0.0) + value

    def gauge(self, name: str) -> float:
        """A gauge summed over the children reporting now: what the primary's own does not
        know (a worker's last batch failing, say)."""
        return sum(
            value
            for samples in self._latest.values()
            for family, sample, _, value in samples
            if family == sample == name
        )

    def totals(self) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
        summed = dict(self._retired)
        absent = [
            stand_in for child, stand_in in self.stand_ins.items() if child not in self._latest
        ]
        for samples in [*self._latest.values(), *(stand_in() for stand_in in absent)]:
            for family, name, labels, value in samples:
                key = (family, name, labels)
                summed[key] = summed.get(key, 0.0) + value
        return summed


def _is_gauge_sample(family: str, name: str) -> bool:
    # A gauge's sample is named like its family; counters and histograms add a suffix.
    return family == name


# (database, entries, bytes, oldest record's time in ms or None): what /metrics shows of each of
# the ledger's databases (Ledger.stats), read when scraped.
DatabaseSample = tuple[str, int, int, int | None]


class _LedgerDatabases(Collector):
    """Registered always (the families exist, empty, in a process without a ledger to watch)."""

    def __init__(self) -> None:
        self.source: Callable[[], list[DatabaseSample]] = list

    def collect(self) -> Iterator[Metric]:
        entries = GaugeMetricFamily(
            "processor_ledger_database_entries",
            "Records in each ledger database",
            labels=["database"],
        )
        size = GaugeMetricFamily(
            "processor_ledger_database_bytes",
            "Bytes of the ledger file each database's pages occupy",
            labels=["database"],
        )
        age = GaugeMetricFamily(
            "processor_ledger_oldest_record_age_seconds",
            "Age of the oldest record, in the databases kept in time order",
            labels=["database"],
        )
        now_ms = time.time() * 1000
        for name, count, occupied, oldest_ms in self.source():
            entries.add_metric([name], count)
            size.add_metric([name], occupied)
            if oldest_ms is not None:
                age.add_metric([name], max(0.0, (now_ms - oldest_ms) / 1000))
        yield entries
        yield size
        yield age


class _Merged(Collector):
    """This process's families with every worker's samples added, label set by label set."""

    def __init__(self, registry: CollectorRegistry, workers: WorkerSamples) -> None:
        self._registry = registry
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        extra = self._workers.totals()
        for family in self._registry.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                merged.add_sample(sample.name, sample.labels, sample.value + extra.pop(key, 0.0))
            for key in [key for key in extra if key[0] == family.name]:
                _, name, labels = key
                merged.add_sample(name, dict(labels), extra.pop(key))
            yield merged
