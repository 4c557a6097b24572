"""The server under twice its sustainable load (short variant of ``mfli bench load``; the 60 s run is the
benchmark): no non-2xx answers, no socket errors, no timeouts, no RSS growth, server still ready."""

from __future__ import annotations

import argparse
import shutil

import pytest

from mfli.benchmarks.load import parse_wrk, run_load
from mfli.config import load_settings

pytestmark = pytest.mark.slow


def test_parse_wrk_counts_errors():
    text = """  Latency Distribution
     50%    1.20ms
     99%   15.00ms
  12000 requests in 4.00s, 3.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 7
  Non-2xx or 3xx responses: 3
Requests/sec:   3000.00
"""
    out = parse_wrk(text)
    assert out == {"non_2xx": 3, "connect": 0, "read": 2, "write": 0, "timeout": 7, "p50_ms": 1.2,
                   "p99_ms": 15.0, "requests": 12000, "rps": 3000.0}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (.ci/run installs it)")
def test_twice_the_sustainable_load_without_errors_or_growth():
    settings = load_settings(model={"dim": 32}, index={"map_size": 1 << 30})
    args = argparse.Namespace(items=5000, connections=16, warmup_seconds=3, probe_seconds=3, seconds=10, timeout=5,
                              allow_timeouts=False, max_rss_growth_mb=30.0)
    out = run_load(args, settings)
    print(f"\nload: sustainable {out['sustainable_rps']:.0f} req/s; 2x ({out['driver']}): "
          f"{out['load']['rps']:.0f} req/s, p50 {out['load'].get('p50_ms')} ms, p99 {out['load'].get('p99_ms')} ms; "
          f"errors {out['errors']:.0f}, timeouts {out['timeouts']:.0f}; "
          f"RSS {out['rss_before_mb']:.1f} -> {out['rss_after_mb']:.1f} MB")
    assert out["load"]["requests"] > 0
    assert out["errors"] == 0 and out["timeouts"] == 0, out
    assert out["server_alive"] and out["ready_after"] and out["server_tracebacks"] == 0, out
    assert out["rss_growth_mb"] <= args.max_rss_growth_mb, out
