"""/metrics of a daemon with worker processes: every process's samples, summed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import DEMO_LOAD_EVENTS

from processor.metrics import Metrics


def value(text: str, sample: str) -> float:
    match = re.search("^" + re.escape(sample) + r" ([0-9.e+]+)$", text, re.M)
    assert match is not None, sample
    return float(match.group(1))


APPROVED = 'processor_requests_total{mti="0100",reason="approved",response_code="00"}'
DECLINED = 'processor_requests_total{mti="0100",reason="insufficient_funds",response_code="51"}'


def test_without_workers_the_exposition_is_the_processs_own() -> None:
    primary = Metrics()
    primary.answered("0100", "00", "approved", 0.001)
    assert value(primary.exposition().decode(), APPROVED) == 1


def test_worker_samples_add_up_label_set_by_label_set() -> None:
    primary, worker = Metrics(), Metrics()
    primary.answered("0100", "00", "approved", 0.001)
    worker.answered("0100", "00", "approved", 0.002)
    worker.answered("0100", "00", "approved", 0.2)
    worker.answered("0100", "51", "insufficient_funds", 0.002)  # only the worker has seen it
    worker.open_links.labels("network").inc(3)
    primary.open_links.labels("network").inc(1)
    primary.workers.update(1, worker.snapshot())
    text = primary.exposition().decode()
    assert value(text, APPROVED) == 3
    assert value(text, DECLINED) == 1
    assert value(text, 'processor_request_latency_seconds_count{mti="0100"}') == 4
    assert value(text, 'processor_request_latency_seconds_bucket{le="0.0015",mti="0100"}') == 1
    assert value(text, 'processor_request_latency_seconds_bucket{le="+Inf",mti="0100"}') == 4
    assert value(text, 'processor_open_links{listener="network"}') == 4
    # Each family is exposed once, with its HELP and TYPE.
    assert text.count("# TYPE processor_requests_total counter") == 1


def test_a_newer_report_replaces_the_older_one() -> None:
    primary, worker = Metrics(), Metrics()
    worker.answered("0100", "00", "approved", 0.001)
    primary.workers.update(1, worker.snapshot())
    worker.answered("0100", "00", "approved", 0.001)
    primary.workers.update(1, worker.snapshot())
    assert value(primary.exposition().decode(), APPROVED) == 2


def test_a_retired_worker_keeps_its_counts_but_not_its_gauges() -> None:
    primary, worker, restarted = Metrics(), Metrics(), Metrics()
    worker.answered("0100", "00", "approved", 0.001)
    worker.open_links.labels("network").inc(5)
    primary.open_links.labels("network")  # the daemon makes each listener's series at start
    primary.workers.update(1, worker.snapshot())
    primary.workers.retire(1)  # it died; its replacement starts counting from zero
    restarted.answered("0100", "00", "approved", 0.001)
    primary.workers.update(1, restarted.snapshot())
    text = primary.exposition().decode()
    assert value(text, APPROVED) == 2  # a total never goes backwards
    assert value(text, 'processor_open_links{listener="network"}') == 0  # died with it


def test_a_batch_counts_like_its_answers_one_by_one() -> None:
    one_by_one, batched = Metrics(), Metrics()
    answers = [
        ("0100", "00", "approved"),
        ("0100", "51", "insufficient_funds"),
        ("0100", "00", "approved"),
        ("0200", "00", "approved"),
    ]
    latencies = [0.0004, 0.0021, 0.0009, 0.3]
    for answer, latency in zip(answers, latencies, strict=True):
        one_by_one.answered(*answer, latency)
    batched.answered_batch(answers, latencies)

    def samples(metrics: Metrics) -> dict[str, float]:
        lines = metrics.exposition().decode().splitlines()
        return {
            name: float(number)
            for name, _, number in (line.rpartition(" ") for line in lines)
            if name.startswith("processor_")  # not the process's CPU and memory: they move
        }

    got, want = samples(batched), samples(one_by_one)
    assert got.keys() == want.keys()
    for name, number in want.items():
        # Counts and buckets exactly; sums of latencies to float rounding (added in another order).
        assert got[name] == pytest.approx(number, rel=1e-12, abs=1e-15), name
    assert got['processor_request_latency_seconds_bucket{le="0.001",mti="0100"}'] == 2
    assert value(batched.exposition().decode(), APPROVED) == 2


def test_peers_cannot_multiply_series_and_operators_get_the_usual_collectors() -> None:
    metrics = Metrics()
    metrics.answered("0100", "57", "country_not_allowed:US", 0.001)
    metrics.answered("0100", "57", "country_not_allowed:FR", 0.001)
    metrics.answered("0999", "12", "unsupported_mti", 0.001)  # an MTI a peer made up
    metrics.answered("0777", "12", "unsupported_mti", 0.001)
    text = metrics.exposition().decode()
    family = 'processor_requests_total{mti="0100",reason="country_not_allowed",response_code="57"}'
    assert value(text, family) == 2
    other = 'processor_requests_total{mti="other",reason="unsupported_mti",response_code="12"}'
    assert value(text, other) == 2
    assert value(text, 'processor_request_latency_seconds_count{mti="other"}') == 2
    # As label values (the process collectors' numbers may contain any digits: "0999" alone
    # matched a memory size now and then).
    assert 'mti="0999"' not in text and 'mti="0777"' not in text and ":US" not in text
    for name in ("process_cpu_seconds_total", "python_gc_objects_collected_total", "python_info"):
        assert name in text, name
    from processor import __version__

    assert f'processor_build_info{{version="{__version__}"}} 1.0' in text


def test_worker_reports_leave_out_what_a_sum_would_garble() -> None:
    families = {family for family, _, _, _ in Metrics().snapshot()}
    assert "process_cpu_seconds" in families  # summed: the daemon's CPU in all
    assert not families & {"process_start_time_seconds", "python_info", "processor_build"}
    # Each process has its own descriptor limit: summed, open/max read (workers + 1) too high.
    assert not families & {"process_open_fds", "process_max_fds"}


def test_while_delivery_is_down_its_backlog_is_read_from_what_it_stored(tmp_path: Path) -> None:
    """The delivery process reports the backlog gauges; when it died (or rested past its
    restart budget) they vanished from /metrics, when an SRE looks for them most."""
    from support import demo_ledger

    from processor.config import Config, LedgerConfig, WebhookEndpoint, WebhooksConfig
    from processor.security import PanHasher
    from processor.webhooks.state import DeliveryFloor, DeliveryState, Disabled

    config = Config(
        ledger=LedgerConfig(path=str(tmp_path / "ledger")),
        webhooks=WebhooksConfig(
            endpoints=(WebhookEndpoint(name="a", url="http://127.0.0.1:9/", secret_envs=("S",)),)
        ),
    )
    ledger = demo_ledger(tmp_path / "ledger", PanHasher(b"metrics-test-key"))
    floor = DeliveryFloor(config)
    try:
        primary = Metrics()
        primary.workers.stand_ins[0] = lambda: floor.stored_samples(ledger)
        backlog = 'processor_outbox_backlog{endpoint="a"}'
        oldest = 'processor_outbox_oldest_undelivered_seconds{endpoint="a"}'
        disabled = 'processor_webhook_endpoint_disabled{endpoint="a"}'
        text = primary.exposition().decode()
        assert value(text, backlog) == DEMO_LOAD_EVENTS  # no state yet: the load's events wait
        assert value(text, oldest) >= 0 and value(text, disabled) == 0
        state = DeliveryState(tmp_path / "ledger" / "webhooks")
        state.advance("a", 4)
        state.disable("a", Disabled(since_ms=1, reason="http_410", event_id="e"))
        state.close()
        text = primary.exposition().decode()
        # Its next is the fourth: that one and every later one wait.
        assert value(text, backlog) == DEMO_LOAD_EVENTS - 3 and value(text, disabled) == 1
        # While it reports, its own gauges are shown, once, in place of these.
        delivery = Metrics()
        delivery.outbox_backlog.labels("a").set(7)
        primary.workers.update(0, delivery.snapshot())
        text = primary.exposition().decode()
        assert value(text, backlog) == 7
        assert text.count(backlog) == 1 and disabled not in text
        primary.workers.retire(0)  # it died again
        assert value(primary.exposition().decode(), backlog) == DEMO_LOAD_EVENTS - 3
    finally:
        floor.close()
        ledger.close()
