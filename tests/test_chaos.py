"""The fault-injection run (``mfli chaos``) at CI size: every process SIGKILLed mid-stream, nothing lost.

The full-size run (200k events) is ``mfli chaos --events 200000``; this is the same code on a smaller
stream so CI stays fast, with every check of the summary asserted individually.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mfli.orchestration.chaos import our_tracebacks

pytestmark = pytest.mark.slow


def test_chaos_run_loses_nothing(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mfli.orchestration.cli", "--log-level", "WARNING", "chaos", "--events", "15000",
         "--kills", "2",
         "--users", "300", "--items", "1000", "--state-dir", str(tmp_path / "state"), "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.exists(), proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["kills"] == {"learner": 2, "indexer": 2, "server": 2, "replica-1": 2, "replica-2": 2}
    for name, check in summary["checks"].items():
        assert check["ok"], (name, check)
    users = summary["checks"]["users_store"]
    assert users["applied"] == users["distinct_valid_events"] > 14_000
    assert summary["checks"]["learner"]["checkpoint_offsets_equal_committed"]
    assert summary["checks"]["index"]["max_vector_diff"] < 1e-3
    for name, statuses in summary["prober"].items():
        assert not [s for s in statuses if s.startswith("5") and s != "503"], (name, statuses)
        assert statuses.get("200", 0) > 0, f"{name} answered while processes were being killed"
    kills = summary["checks"]["kills"]
    assert kills["kills"] == 10 and not kills["not_mid_stream"]
    for name in ("replica-1", "replica-2"):
        replica = summary["checks"]["replicas"][name]
        assert replica["index_equal"] and replica["users_with_other_event_ids"] == 0, replica
        assert replica["items"] > 500 and replica["users"] == 300
    assert proc.returncode == 0


def test_log_check_counts_our_tracebacks_once_per_record_and_not_kafka_nets():
    """A chained traceback belongs to the record that started it: ours count once, and kafka-python's
    network layer logging its own closed sockets (even as a chain) counts not at all."""
    ours = ("t ERROR mfli.server: boom\nTraceback (most recent call last):\n  File a\nValueError\n\n"
            "During handling of the above exception, another exception occurred:\n\n"
            "Traceback (most recent call last):\n  File b\nKeyError\n")
    theirs = ours.replace("mfli.server: boom", "kafka.net.selector: Unhandled exception in task")
    assert our_tracebacks(ours) == ["t ERROR mfli.server: boom"]
    assert our_tracebacks(theirs) == []
    assert our_tracebacks("Traceback (most recent call last):\nX") == [""]
