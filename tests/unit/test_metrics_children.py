"""Metrics.child: label children resolved once, counting into the series labels() names."""

from __future__ import annotations

import re

import pytest

from processor import metrics as metrics_module
from processor.metrics import Metrics


def value(text: str, sample: str) -> float:
    match = re.search("^" + re.escape(sample) + r" ([0-9.e+]+)$", text, re.M)
    assert match is not None, sample
    return float(match.group(1))


def test_a_child_is_resolved_once_and_counts_like_labels() -> None:
    metrics = Metrics()
    first = metrics.child(metrics.bad_messages, "network", "format_error", "4")
    assert metrics.child(metrics.bad_messages, "network", "format_error", "4") is first
    first.inc()
    metrics.child(metrics.bad_messages, "network", "format_error", "4").inc(2)
    metrics.bad_messages.labels("network", "format_error", "4").inc()  # the same series
    metrics.child(metrics.links_closed, "network", "bad_message_rate").inc()
    text = metrics.exposition().decode()
    bad = 'processor_bad_messages_total{field="4",kind="format_error",listener="network"}'
    closed = 'processor_links_closed_total{listener="network",reason="bad_message_rate"}'
    assert value(text, bad) == 4
    assert value(text, closed) == 1


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "CHILDREN_CACHED_MAX", 3)
    metrics = Metrics()
    for field in range(10):
        metrics.child(metrics.bad_messages, "network", "format_error", str(field)).inc()
    assert len(metrics._children) <= 3
    text = metrics.exposition().decode()
    for field in range(10):  # counted all the same
        labels = f'field="{field}",kind="format_error",listener="network"'
        assert value(text, f"processor_bad_messages_total{{{labels}}}") == 1
