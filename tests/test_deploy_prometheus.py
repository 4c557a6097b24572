"""A real Prometheus server scrapes a real mfli metrics endpoint (proves tests/prometheus_harness.py).

The endpoint is a separate Python process that imports ``mfli.metrics`` (the one registry every process
uses), sets a few metrics to known values and serves them with prometheus_client's HTTP server, the
same way the learner and indexer do. Prometheus must see those exact values through its query API,
with the exposed names (``_total``, ``_bucket``) that dashboards and alert rules use.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from prometheus_harness import PrometheusHarness, require_prometheus

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"

# Child process: known metric values, then serve until stdin closes. It prints its port so there is no
# race between picking a free port and binding it.
_ENDPOINT = textwrap.dedent(
    """
    import sys
    from mfli import metrics as m
    m.EVENTS_CONSUMED.labels(topic="mfli.events").inc(42)
    m.EVENTS_INVALID.labels(reason="schema").inc(3)
    m.CONSUMER_LAG.labels(topic="mfli.events", partition="0").set(17)
    m.CODEBOOK_UTILISATION.labels(facet="0", level="0").set(float(sys.argv[1]))
    m.INDEX_RECALL.labels(k="100").set(0.93)
    for value in (0.2, 0.3, 0.4, 3.0):
        m.FRESHNESS_SECONDS.observe(value)
    m.UP.labels(process="learner").set(1)
    server, _ = m.start_http_server(0, addr="127.0.0.1")
    print(server.server_port, flush=True)
    sys.stdin.read()
    """
)


def _start_endpoint(utilisation: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENDPOINT, str(utilisation)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"metrics endpoint did not start (got {line!r}, rc={proc.poll()})")
    return proc, int(line)


@pytest.fixture
def endpoint() -> Iterator[int]:
    """Port of a live mfli metrics endpoint with a collapsed codebook (utilisation 0.05)."""
    proc, port = _start_endpoint(utilisation=0.05)
    try:
        yield port
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # lets the child exit on its own
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_real_prometheus_scrapes_mfli_metrics(endpoint: int, tmp_path: Path) -> None:
    require_prometheus()
    with PrometheusHarness({"learner": [f"127.0.0.1:{endpoint}"]}, workdir=tmp_path) as prom:
        prom.wait_until_up("learner")
        assert prom.targets_health() == [{"job": "learner", "health": "up", "lastError": ""}]

        consumed = prom.wait_for('mfli_events_consumed_total{job="learner"}')
        assert consumed[0]["value"] == 42.0
        assert consumed[0]["metric"]["topic"] == "mfli.events"
        assert prom.scalar('mfli_events_invalid_total{reason="schema"}') == 3.0
        assert prom.scalar('mfli_consumer_lag_messages{partition="0"}') == 17.0
        assert prom.scalar("mfli_codebook_utilisation_ratio") == pytest.approx(0.05)
        assert prom.scalar('mfli_index_recall_ratio{k="100"}') == pytest.approx(0.93)
        assert prom.scalar("mfli_index_freshness_seconds_count") == 4.0
        # Three of four observations are <= 0.5 s: the cumulative bucket says so after the scrape.
        assert prom.scalar('mfli_index_freshness_seconds_bucket{le="0.5"}') == 3.0
        # The quantile the freshness alert and dashboard use is computable from the scraped buckets.
        p50 = prom.scalar("histogram_quantile(0.5, sum by (le) (mfli_index_freshness_seconds_bucket))")
        assert p50 is not None and 0.25 <= p50 <= 0.5

        # Something that does not exist stays empty (guards against a query helper that always returns).
        assert prom.query("mfli_no_such_metric") == []
    assert not prom.running


@pytest.mark.slow
def test_alert_rules_evaluate_on_live_data(endpoint: int, tmp_path: Path) -> None:
    """The project's alert rules load into a real server, and the collapse alert goes pending on a
    scraped utilisation of 0.05 while the recall alert (0.93 is healthy) stays quiet."""
    require_prometheus()
    targets = {"learner": [f"127.0.0.1:{endpoint}"]}
    with PrometheusHarness(targets, workdir=tmp_path, rule_files=[ALERTS]) as prom:
        groups = prom.api("rules")["groups"]
        loaded = {rule["name"] for group in groups for rule in group["rules"]}
        assert {"MfliCodebookCollapse", "MfliIndexRecallLow", "MfliFreshnessP95High"} <= loaded
        alerts = prom.wait_for(
            'ALERTS{alertname="MfliCodebookCollapse"}', timeout_s=30
        )
        assert alerts[0]["metric"]["facet"] == "0"
        assert alerts[0]["metric"]["alertstate"] in {"pending", "firing"}
        # The recall alert shares the scrape but its threshold is not crossed.
        assert prom.query('ALERTS{alertname="MfliIndexRecallLow"}') == []
