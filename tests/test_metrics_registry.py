"""The metrics registry, its documentation and its consumers (dashboard, alerts) cannot drift apart.

mfli/metrics.py is the one place metrics are defined; docs/metrics.md documents them; the Grafana
dashboard and the alert rules query them. A renamed metric silently empties a panel or disarms an
alert, so these tests compare all four by name, type and labels, and lint names the way Prometheus does.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

import mfli.metrics

from prometheus_harness import require_prometheus

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "mfli.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

FORBIDDEN_LABELS = {"user", "item", "user_id", "item_id", "event_id", "id", "uid"}
# Name tokens that mean a non-base unit (Prometheus wants seconds, bytes, ratios).
NON_BASE_UNITS = {
    "ms", "millis", "milliseconds", "us", "microseconds", "ns", "nanoseconds", "minutes", "hours", "days",
    "kb", "mb", "gb", "kilobytes", "megabytes", "gigabytes", "percent", "pct",
}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
MFLI_NAME = re.compile(r"\bmfli_[a-z0-9_]*[a-z0-9]")


@dataclass(frozen=True)
class Metric:
    base: str  # the name given to prometheus_client (without _total)
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]

    @property
    def primary(self) -> str:
        """The name a user queries first: ``_total`` for counters, the family name otherwise."""
        return self.base + ("_total" if self.kind == "counter" else "")

    @property
    def exposed(self) -> set[str]:
        """Every sample name Prometheus stores for it (``_created`` left out: disabled in deploy/)."""
        return {self.base + suffix for suffix in SUFFIXES[self.kind]}


def registry() -> dict[str, Metric]:
    """Every metric object defined in mfli/metrics.py, by primary (as-exposed) name."""
    found = [
        Metric(obj._name, obj._type, tuple(obj._labelnames))
        for obj in vars(mfli.metrics).values()
        if isinstance(obj, MetricWrapperBase)
    ]
    assert len(found) > 30, "mfli.metrics should define every metric of docs/metrics.md"
    return {m.primary: m for m in found}


@dataclass(frozen=True)
class DocRow:
    name: str
    kind: str
    labels: tuple[str, ...]
    unit: str
    process: str
    meaning: str


def doc_rows(text: str) -> list[DocRow]:
    """Rows of the metric tables in docs/metrics.md (first cell starts with a backticked mfli_ name)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("`mfli_"):
            continue
        name = re.match(r"`(mfli_[a-z0-9_]+)`", cells[0])
        assert name, f"bad name cell: {cells[0]!r}"
        labels = () if cells[2] in {"—", "-", ""} else tuple(label.strip() for label in cells[2].split(","))
        rows.append(DocRow(name.group(1), cells[1], labels, cells[3], cells[4], cells[5]))
    return rows


def resolve(name: str, metrics: dict[str, Metric]) -> Metric | None:
    """The registry metric a PromQL identifier refers to, honouring the suffix its type exposes.

    ``mfli_request_seconds_bucket`` -> the histogram; ``mfli_events_consumed`` (no ``_total``) -> None,
    because Prometheus stores no such series and a panel using it would stay empty.
    """
    for metric in metrics.values():
        if name in metric.exposed:
            return metric
    return None


def promql_names(exprs: list[str]) -> set[str]:
    return {m for expr in exprs for m in MFLI_NAME.findall(expr)}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def alert_texts() -> list[str]:
    """Rule expressions and annotations (a description naming a wrong metric misleads the on-call too)."""
    texts = []
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            texts.append(rule["expr"])
            texts.extend(rule.get("annotations", {}).values())
    return texts


# --- documentation <-> registry ---------------------------------------------------------------------
def test_every_registry_metric_is_documented_and_vice_versa() -> None:
    metrics = registry()
    rows = doc_rows(DOC.read_text())
    documented = [r.name for r in rows]
    assert len(documented) == len(set(documented)), "a metric is documented twice"
    assert sorted(set(metrics) - set(documented)) == [], "defined in mfli/metrics.py but not in docs/metrics.md"
    assert sorted(set(documented) - set(metrics)) == [], "in docs/metrics.md but not defined in mfli/metrics.py"


def test_documented_type_labels_and_unit_match_the_registry() -> None:
    metrics = registry()
    for row in doc_rows(DOC.read_text()):
        metric = metrics[row.name]
        assert row.kind == metric.kind, f"{row.name}: documented as {row.kind}, defined as {metric.kind}"
        assert set(row.labels) == set(metric.labels), f"{row.name}: labels {row.labels} vs {metric.labels}"
        for unit in ("seconds", "bytes", "ratio"):
            assert (row.unit == unit) == metric.base.endswith(f"_{unit}"), (
                f"{row.name}: unit column {row.unit!r} disagrees with the name's unit suffix"
            )
        assert row.process and row.meaning, f"{row.name}: process and meaning must be filled in"


def test_doc_parser_reads_labels_and_rejects_nothing_silently() -> None:
    rows = doc_rows(
        "| `mfli_x_seconds` (`_bucket`, `_sum`, `_count`) | histogram | route, status | seconds | server | m |\n"
        "| `mfli_y_total` | counter | — | events | learner | m |\n| not a row |"
    )
    assert rows == [
        DocRow("mfli_x_seconds", "histogram", ("route", "status"), "seconds", "server", "m"),
        DocRow("mfli_y_total", "counter", (), "events", "learner", "m"),
    ]


# --- naming conventions -----------------------------------------------------------------------------
@pytest.mark.parametrize("metric", sorted(registry().values(), key=lambda m: m.base), ids=lambda m: m.base)
def test_naming_conventions(metric: Metric) -> None:
    assert metric.base.startswith("mfli_"), "every metric carries the mfli_ prefix"
    assert re.fullmatch(r"[a-z][a-z0-9_]*", metric.base), "snake_case only"
    if metric.kind == "counter":
        assert metric.primary.endswith("_total") and not metric.base.endswith("_total")
    else:
        assert not metric.base.endswith("_total"), "only counters end in _total"
    assert not NON_BASE_UNITS & set(metric.base.split("_")), "use base units: seconds, bytes, ratio"
    assert not FORBIDDEN_LABELS & set(metric.labels), "no per-user / per-item labels (unbounded cardinality)"


def test_exposition_passes_promtool_lint() -> None:
    """``promtool check metrics`` applies Prometheus's own naming lint to what /metrics really serves.

    Runs in a subprocess: it creates one child per labelled metric, which must not leak into the
    registry the other tests read values from.
    """
    promtool = require_prometheus("promtool")
    script = textwrap.dedent(
        """
        import sys
        from prometheus_client import REGISTRY, generate_latest
        from prometheus_client.metrics import MetricWrapperBase
        import mfli.metrics as m
        for obj in vars(m).values():
            if isinstance(obj, MetricWrapperBase) and obj._labelnames:
                obj.labels(*["0"] * len(obj._labelnames))
        sys.stdout.write(generate_latest(REGISTRY).decode())
        """
    )
    exposition = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "mfli_codebook_utilisation_ratio{" in exposition
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"


def test_promtool_lint_has_teeth() -> None:
    """The lint above would catch a bad name: feed it one and expect a complaint."""
    promtool = require_prometheus("promtool")
    bad = "# HELP mfli_step_ms x\n# TYPE mfli_step_ms counter\nmfli_step_ms 1\n"
    lint = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True)
    assert lint.returncode != 0 and "_total" in lint.stdout + lint.stderr


# --- dashboard and alerts -> registry ---------------------------------------------------------------
def test_resolve_honours_suffix_per_type() -> None:
    metrics = registry()
    assert resolve("mfli_request_seconds_bucket", metrics) == metrics["mfli_request_seconds"]
    assert resolve("mfli_index_freshness_seconds_count", metrics) == metrics["mfli_index_freshness_seconds"]
    assert resolve("mfli_events_consumed_total", metrics) == metrics["mfli_events_consumed_total"]
    assert resolve("mfli_codebook_utilisation_ratio", metrics) == metrics["mfli_codebook_utilisation_ratio"]
    # Names Prometheus never stores: a panel or rule using them would be silently empty.
    assert resolve("mfli_events_consumed", metrics) is None
    assert resolve("mfli_codebook_utilisation_ratio_total", metrics) is None
    assert resolve("mfli_request_seconds", metrics) is None
    assert resolve("mfli_request_seconds_total", metrics) is None
    assert promql_names(['sum(rate(mfli_a_total{job="mfli-server"}[5m])) / mfli_b_bucket']) == {
        "mfli_a_total", "mfli_b_bucket"
    }


def test_dashboard_uses_only_registry_metrics() -> None:
    metrics = registry()
    names = promql_names(dashboard_exprs())
    assert len(names) > 20
    unknown = sorted(n for n in names if resolve(n, metrics) is None)
    assert unknown == [], f"dashboard queries series mfli/metrics.py does not expose: {unknown}"


def test_dashboard_shows_every_registry_metric() -> None:
    """Issue 6 asks for everything "visible over time": no defined metric is left off the dashboard."""
    metrics = registry()
    used = {resolve(n, metrics) for n in promql_names(dashboard_exprs())}
    missing = sorted(m.primary for m in metrics.values() if m not in used)
    assert missing == [], f"metrics with no dashboard panel: {missing}"


def test_alert_rules_use_only_registry_metrics() -> None:
    metrics = registry()
    names = promql_names(alert_texts())
    for required in ("mfli_codebook_utilisation_ratio", "mfli_index_freshness_seconds_bucket",
                     "mfli_index_recall_ratio", "mfli_prequential_recall_ratio",
                     "mfli_consumer_lag_messages", "mfli_events_invalid_total"):
        assert required in names, f"alert rules should watch {required}"
    unknown = sorted(n for n in names if resolve(n, metrics) is None)
    assert unknown == [], f"alert rules reference series mfli/metrics.py does not expose: {unknown}"
