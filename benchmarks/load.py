"""``mfli bench load``: the server under twice its sustainable load on loopback (issue 7).

1. A synthetic catalogue is written to a real LMDB index and users store (as ``mfli bench serve`` does), a
   real ``mfli serve`` process (one worker) is started on loopback.
2. **Sustainable rate**: ``wrk`` with ``--connections`` for ``--probe-seconds`` (closed loop: each
   connection sends its next request when the previous answer arrived, so this is the throughput the
   server sustains at that concurrency).
3. **Overload**: twice that demand for ``--seconds``. Debian's ``wrk`` has no constant-rate mode (wrk2's
   ``-R``); when a ``wrk2`` binary is on PATH it is used at 2x the measured rate (open loop, latency
   corrected for coordinated omission), otherwise ``wrk`` runs with twice the connections, i.e. twice the
   offered concurrency — the server is already saturated, so the excess waits in its accept/read queues
   and shows up as latency, which is the point of the exercise.
4. Checks: no non-2xx answers, no socket errors other than timeouts (``wrk`` counts a request that takes
   longer than ``--timeout`` as a timeout; they are reported, and counted as failures unless
   ``--allow-timeouts``), and no memory growth: the server's RSS (``/proc/PID/status`` VmRSS) after the
   overload minus after the warm-up stays under ``--max-rss-growth-mb``. Reported: req/s, p50/p99, RSS.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from mfli.benchmarks.http_cpu import start_server
from mfli.benchmarks.report import Row, result
from mfli.benchmarks.serve import write_lmdb
from mfli.benchmarks.workloads import synthetic_catalogue, synthetic_histories

log = logging.getLogger(__name__)

_SCRIPT = """
math.randomseed(%d)
local users = %d
local items = %d
request = function()
  local r = math.random()
  if r < 0.8 then
    return wrk.format("GET", "/v1/recommend?user_id=u" .. math.random(0, users - 1) .. "&k=20")
  elseif r < 0.95 then
    return wrk.format("GET", "/v1/items/i" .. math.random(0, items - 1) .. "/similar?k=20")
  else
    return wrk.format("GET", "/v1/recommend?user_id=new" .. math.random(0, 1000000) .. "&k=20")
  end
end
"""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parse_wrk(text: str) -> dict[str, float]:
    """req/s, p50/p99 (ms), requests, non-2xx and socket errors from ``wrk --latency`` output."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}
    out: dict[str, float] = {"non_2xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            out["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%", "50.000%", "99.000%"):
            value = parts[1]
            unit = next(u for u in ("us", "ms", "s", "m") if value.endswith(u))
            out[f"p{parts[0].split('.')[0].rstrip('%')}_ms"] = float(value[: -len(unit)]) * units[unit]
        elif "requests in" in line:
            out["requests"] = float(parts[0])
        elif "Non-2xx" in line:
            out["non_2xx"] = float(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            for field in line.split(":", 1)[1].split(","):
                name, value = field.split()
                out[name] = float(value)
    return out


def _wrk(args: list[str]) -> dict[str, float]:
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    res = parse_wrk(done.stdout)
    log.info("%s -> %s", " ".join(args[:6]), res)
    if "rps" not in res:
        raise RuntimeError(f"could not parse wrk output:\n{done.stdout}\n{done.stderr}")
    return res


def run_load(args: argparse.Namespace, settings) -> dict:
    """The whole measurement; returns a plain dict (the test asserts on it, ``run`` tabulates it)."""
    wrk = shutil.which("wrk")
    wrk2 = shutil.which("wrk2")
    if wrk is None:
        raise RuntimeError("wrk is not installed (apt-get install -y wrk)")
    users = 2000
    out: dict = {"items": args.items, "connections": args.connections}
    with tempfile.TemporaryDirectory(prefix="mfli-bench-load-") as tmp:
        root = Path(tmp)
        snap = synthetic_catalogue(args.items, facets=settings.model.facets, dim=settings.model.dim,
                                   levels=settings.model.levels, seed=1)
        write_lmdb(snap, root / "index.lmdb", root / "users.lmdb",
                   synthetic_histories(snap, users, history=settings.model.history, seed=2), settings)
        script = root / "load.lua"
        script.write_text(_SCRIPT % (1, users, args.items))
        proc, base = start_server(root, settings)
        try:
            common = ["--latency", "--timeout", f"{args.timeout}s", "-s", str(script), base]
            # warm-up: page cache, the server's dense mirror and first-touch allocations (measured: at 100k
            # items the first seconds run at a fraction of the steady rate and RSS still climbs)
            _wrk([wrk, "-t1", f"-c{args.connections}", f"-d{args.warmup_seconds}s", *common])
            out["rss_warm_mb"] = rss_mb(proc.pid)
            probe = _wrk([wrk, "-t1", f"-c{args.connections}", f"-d{args.probe_seconds}s", *common])
            out["sustainable_rps"], out["probe"] = probe["rps"], probe
            out["rss_before_mb"] = rss_mb(proc.pid)
            if wrk2:
                out["driver"] = f"wrk2 -R {2 * probe['rps']:.0f} (constant rate, open loop)"
                load = _wrk([wrk2, "-t2", f"-c{2 * args.connections}", f"-d{args.seconds}s",
                             f"-R{int(2 * probe['rps'])}", *common])
            else:
                out["driver"] = f"wrk -c{2 * args.connections} (2x the probe's concurrency, closed loop; no wrk2)"
                load = _wrk([wrk, "-t2", f"-c{2 * args.connections}", f"-d{args.seconds}s", *common])
            out["load"] = load
            time.sleep(1.0)
            out["rss_after_mb"] = rss_mb(proc.pid)
            out["server_alive"] = proc.poll() is None
            ready = httpx.get(f"{base}/readyz", timeout=5)
            out["ready_after"] = ready.status_code == 200
        finally:
            proc.terminate()
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            out["server_tracebacks"] = err.decode(errors="replace").count("Traceback")
    load = out["load"]
    out["errors"] = load["non_2xx"] + load["connect"] + load["read"] + load["write"]
    out["timeouts"] = load["timeout"]
    out["rss_growth_mb"] = out["rss_after_mb"] - out["rss_before_mb"]
    out["ok"] = (out["errors"] == 0 and (args.allow_timeouts or out["timeouts"] == 0) and out["server_alive"]
                 and out["ready_after"] and out["server_tracebacks"] == 0
                 and out["rss_growth_mb"] <= args.max_rss_growth_mb)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections of the sustainable-rate probe")
    parser.add_argument("--warmup-seconds", type=int, default=20, help="wrk warm-up before measuring")
    parser.add_argument("--probe-seconds", type=int, default=10, help="duration of the sustainable-rate probe")
    parser.add_argument("--seconds", type=int, default=60, help="duration of the 2x overload")
    parser.add_argument("--timeout", type=int, default=5, help="wrk request timeout (s)")
    parser.add_argument("--allow-timeouts", action="store_true", help="do not count wrk timeouts as failures")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0, help="allowed RSS growth during the overload")


def run(args: argparse.Namespace, settings) -> dict:
    out = run_load(args, settings)
    probe, load = out["probe"], out["load"]
    rows = [
        Row("sustainable req/s (probe)", probe["rps"], "requests/s",
            note=f"{args.connections} conns, {args.probe_seconds}s"),
        Row("probe p99", probe.get("p99_ms", float("nan")), "ms"),
        Row("2x load req/s", load["rps"], "requests/s", note=out["driver"]),
        Row("2x load p50", load.get("p50_ms", float("nan")), "ms"),
        Row("2x load p99", load.get("p99_ms", float("nan")), "ms"),
        Row("2x load requests", load.get("requests", 0), "requests", note=f"{args.seconds}s"),
        Row("errors (non-2xx + socket connect/read/write)", out["errors"], "count"),
        Row("timeouts", out["timeouts"], "count", note=f"> {args.timeout}s"),
        Row("server RSS before 2x load", out["rss_before_mb"], "MB"),
        Row("server RSS after 2x load", out["rss_after_mb"], "MB"),
    ]
    targets = {
        "no errors under 2x load": out["errors"] == 0 and (args.allow_timeouts or out["timeouts"] == 0),
        f"RSS growth <= {args.max_rss_growth_mb:g} MB": out["rss_growth_mb"] <= args.max_rss_growth_mb,
        "server alive and ready after, no tracebacks": out["server_alive"] and out["ready_after"]
        and out["server_tracebacks"] == 0,
    }
    return result("load", rows, params={k: v for k, v in vars(args).items()}, targets=targets,
                  notes=[f"driver: {out['driver']}", f"RSS after warm-up {out['rss_warm_mb']:.1f} MB"])
