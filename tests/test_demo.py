"""The README's main job: ``mfli demo`` as a user runs it (a subprocess, default settings, free ports).

Within 2 minutes ``GET /v1/recommend`` for a user with events answers 200 from the index (not the
popularity fallback) and the status line shows freshness and recall values (not nan); Ctrl-C (SIGINT)
stops everything with exit status 0 and leaves an HTML report with real plots behind. At the default
log level the terminal shows the banner and status lines only: log records go to the log files.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from prometheus_harness import free_port
from test_report import check_report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STATUS = re.compile(
    r"events/s\s+(?P<rate>\S+) \| lag\s+(?P<lag>\S+) \| freshness p95\s+(?P<fresh>\S+)s \| "
    r"index recall@\d+\s+(?P<recall>\S+) \| prequential\s+(?P<preq>\S+) \| items\s+(?P<items>\S+) "
    r"clusters\s+(?P<clusters>\S+)"
)
BUDGET_S = 120.0
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")  # the CLI's logging format


def test_demo_serves_shows_freshness_and_recall_and_stops_cleanly(tmp_path: Path) -> None:
    port, learner_port, index_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MFLI_LEARNER__METRICS_PORT": str(learner_port),
           "MFLI_INDEX__METRICS_PORT": str(index_port), "PYTHONUNBUFFERED": "1"}
    for key in [k for k in env if k.startswith("MFLI_KAFKA__")]:
        del env[key]  # the demo must work with no configuration: embedded broker
    report = tmp_path / "demo-report.html"
    cmd = [sys.executable, "-m", "mfli.orchestration.cli", "demo", "--duration", "300",
           "--state-dir", str(tmp_path / "state"), "--port", str(port), "--status-interval", "1",
           "--report", str(report)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()

    def output() -> str:
        return "".join(lines[-40:])

    answer = None
    good_status = None
    try:
        with httpx.Client(timeout=3) as client:
            while time.monotonic() - started < BUDGET_S and (answer is None or good_status is None):
                assert proc.poll() is None, f"demo exited early ({proc.returncode}):\n{output()}"
                if answer is None:
                    try:
                        r = client.get(f"http://127.0.0.1:{port}/v1/recommend", params={"user_id": "u1", "k": 10})
                        if r.status_code == 200 and not r.json()["fallback"] and r.json()["items"]:
                            answer = (time.monotonic() - started, r.json())
                    except httpx.HTTPError:
                        pass
                if good_status is None:
                    for line in list(lines):
                        m = STATUS.search(line)
                        # recall measured on a clustered index (more clusters than facets), not the one
                        # cluster per facet the pre-warm-up codebook gives
                        if (m and not math.isnan(float(m["fresh"])) and not math.isnan(float(m["recall"]))
                                and float(m["clusters"]) > 3):
                            good_status = (time.monotonic() - started, line.strip())
                            break
                time.sleep(1.0)
        assert answer is not None, f"no index answer for u1 within {BUDGET_S} s:\n{output()}"
        assert good_status is not None, f"no status line with freshness and recall within {BUDGET_S} s:\n{output()}"
        m = STATUS.search(good_status[1])
        assert 0 <= float(m["fresh"]) <= 60 and 0 <= float(m["recall"]) <= 1
        assert float(m["items"]) > 0
        items = answer[1]["items"]
        assert len(items) == 10 and {i["source"] for i in items} <= {"cluster", "trending", "fresh"}
        print(f"\nindex answer for u1 after {answer[0]:.0f} s; status with freshness+recall after "
              f"{good_status[0]:.0f} s:\n{good_status[1]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(timeout=5)
    print("".join(lines[-8:]))
    assert rc == 0, f"demo exit status {rc}:\n{output()}"
    assert "stopping" in "".join(lines) and "!!" not in "".join(lines), output()
    logged = [line for line in lines if LOG_RECORD.match(line)]
    assert logged == [], f"log records on the demo's terminal:\n{''.join(logged[:10])}"
    demo_log = (tmp_path / "state" / "logs" / "demo.log").read_text()
    assert "INFO httpx" in demo_log and "tansu broker ready" in demo_log  # they went to the file instead
    with pytest.raises(httpx.HTTPError):  # the server child is gone too
        httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1)
    check_report(report)
