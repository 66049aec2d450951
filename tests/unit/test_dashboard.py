"""config/grafana-dashboard.json: loads, every panel queries, and only metrics that exist.

A renamed or retyped metric must break the dashboard here, loudly, not show an empty panel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from processor.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"

# Keep equal to the metrics the dashboard is meant to show (names without _total/_bucket/...).
DASHBOARD_METRICS = {
    "processor_requests",
    "processor_request_latency_seconds",
    "processor_commit_batch_size",
    "processor_commit_seconds",
    "processor_ledger_checkpoint_seconds",
    "processor_open_links",
    "processor_bad_messages",
    "processor_links_closed",
    "processor_http_connections_refused",
    "processor_child_process_up",
    "processor_outbox_backlog",
    "processor_outbox_oldest_undelivered_seconds",
    "processor_webhook_delivery_seconds",
    "processor_webhook_failures",
    "processor_webhook_dead_letters",
    "processor_ledger_map_used_bytes",
    "processor_ledger_map_size_bytes",
    "processor_ledger_map_ceiling_bytes",
    "processor_ledger_database_bytes",
    "processor_ledger_database_entries",
    "processor_ledger_oldest_record_age_seconds",
    "processor_holds_expired",
    "processor_retention_pruned",
    "processor_retention_kept",
    "processor_retention_step_seconds",
    "processor_internal_errors",
    "processor_log_lines_suppressed",
    "processor_webhook_endpoint_disabled",
}

METRIC = re.compile(r"processor_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
# The series suffix a query uses says what type the metric must be.
SUFFIX_TYPES = {"_bucket": "histogram", "_sum": "histogram", "_count": "histogram"}


def normalise(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that shows data; rows only group them (a collapsed row holds its own)."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in data_panels(dashboard) for t in p.get("targets", []) if "expr" in t]
    # Template variables query Prometheus too (label_values(...)).
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def test_the_dashboard_loads(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for r in dashboard["panels"] for p in r.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_queries_prometheus(dashboard: dict[str, Any]) -> None:
    panels = data_panels(dashboard)
    # Some panels show several series of one thing (the ledger map: used, size and ceiling;
    # retention: records pruned and kept; commit time: batches and checkpoints).
    assert len(panels) >= len(DASHBOARD_METRICS) - 5
    for panel in panels:
        targets = [t for t in panel.get("targets", []) if t.get("expr", "").strip()]
        assert targets, f"panel {panel['title']!r} has no target with an expr"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert "gridPos" in panel, panel["title"]


def test_every_metric_used_is_a_known_one_and_every_known_one_used(
    dashboard: dict[str, Any],
) -> None:
    used = {normalise(name) for expr in expressions(dashboard) for name in METRIC.findall(expr)}
    assert used - DASHBOARD_METRICS == set(), "the dashboard queries metrics not in the list"
    assert DASHBOARD_METRICS - used == set(), "metrics in the list that no panel shows"


def test_the_metrics_exist_with_the_types_the_queries_assume(dashboard: dict[str, Any]) -> None:
    types = {family.name: family.type for family in Metrics().registry.collect()}
    missing = DASHBOARD_METRICS - set(types)
    assert missing == set(), f"processor/metrics.py no longer registers {sorted(missing)}"
    for expr in expressions(dashboard):
        for name in METRIC.findall(expr):
            base = normalise(name)
            suffix = name[len(base) :]
            if suffix == "_total":
                assert types[base] == "counter", f"{name} in {expr!r}: {base} is {types[base]}"
            elif suffix:
                assert types[base] == SUFFIX_TYPES[suffix], f"{name}: {base} is {types[base]}"
            else:
                assert types[base] == "gauge", f"{name} in {expr!r}: {base} is {types[base]}"
