"""CPU per ``GET /v1/recommend`` in the server against the same service call in process (issue 13).

Why CPU seconds and not wall time: the box is shared, so wall time measures the neighbours too; the
CPU a process spends per request does not (much). Method, over one LMDB index + users store:

* **in process**: an :class:`~mfli.server.lmdb_state.LmdbState` (mirror on, as the server opens it) and a
  :class:`~mfli.server.service.RecommendService`; per request one read transaction and
  ``service.recommend(state, user_id, ...)`` (users-store read, query encoder, retrieval, ids, the answer
  dict), plus the same ``orjson.dumps`` the server does. ``time.process_time()`` over all requests.
* **server**: a real one-worker ``mfli serve`` (no monitor thread, which samples recall on its own
  schedule, not per request) pinned to one core (``taskset``), ``wrk`` on the other core driving the
  same users; CPU from ``/proc/<pid>/stat`` (all threads) divided by the requests ``wrk`` completed.

The ratio server / in-process is the HTTP overhead factor (target <= 1.3 at 10^6 items). Then a closed
loop at about half the saturating rate (``wrk`` with a per-request delay) gives p50/p99 without queueing.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace as dc_replace
from pathlib import Path

import orjson

from mfli.lifecycle import free_port
from mfli.orchestration.supervisor import wait_http

log = logging.getLogger(__name__)

_CLK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """utime + stime (seconds) of a process, all its threads, from ``/proc/<pid>/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def in_process_cpu(settings, users: int, k: int, requests: int, seed: int = 0) -> dict:
    """CPU seconds per request of the service call (and of retrieval alone) in this process."""
    from mfli.server.lmdb_state import LmdbState
    from mfli.server.service import RecommendService

    source = LmdbState(settings)
    source.open()
    service = RecommendService(settings)
    rng = random.Random(seed)
    ids = [f"u{rng.randrange(users)}" for _ in range(requests)]
    try:
        def call(user: str) -> bytes:
            with source.read() as state:
                return orjson.dumps(service.recommend(state, user, [], [], k, "index", True))

        for user in ids[: min(200, requests)]:  # warm: mirror load, compiled kernels, caches
            call(user)
        t0, w0 = time.process_time(), time.perf_counter()
        for user in ids:
            call(user)
        full = (time.process_time() - t0) / requests
        wall = (time.perf_counter() - w0) / requests
        # retrieval alone: history already read, no ids or answer dict
        with source.read() as state:
            found = [state.history(u) for u in ids[:500]]
        t0 = time.process_time()
        for history in found:
            with source.read() as state:
                service.retrieve(state, history[0], history[0], k, "index", history_ts=history[1])
        retrieval = (time.process_time() - t0) / len(found)
    finally:
        source.close()
    return {"cpu_per_request_s": full, "wall_per_request_s": wall, "retrieval_cpu_per_request_s": retrieval}


def parse_wrk(text: str) -> dict[str, float]:
    """req/s and latency percentiles (ms) from ``wrk --latency`` output."""
    units = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    out: dict[str, float] = {}
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            out["rps"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            value = parts[1]
            unit = next(u for u in ("us", "ms", "s") if value.endswith(u))
            out[f"p{parts[0][:-1]}_ms"] = float(value[: -len(unit)]) * units[unit]
        elif "Non-2xx" in line:
            out["non_2xx"] = float(parts[-1])
    return out


@contextmanager
def republishing(index_path: Path, settings, interval_s: float) -> Iterator[dict]:
    """While the block runs, write the index's query encoder again under a new version every
    ``interval_s``, as the learner publishes its weights while it learns (``learner.model_publish_interval_s``).

    Why: the server caches each item's encoder input per weights version (:mod:`mfli.retrieval.inputs`);
    with weights that never change the cache would be warm for the whole run and the encoder's cost
    understated. The writer runs in a child process (py-lmdb opens an environment once per process, and
    the in-process measurement opens it too). Yields a dict whose ``"versions"`` holds the number of
    publications once the block has ended (0 without a model or with ``interval_s`` 0)."""
    state = {"versions": 0}
    if interval_s <= 0:
        yield state
        return
    ctx = multiprocessing.get_context("spawn")
    stop, count = ctx.Event(), ctx.Value("i", 0)
    proc = ctx.Process(target=_republish, args=(str(index_path), settings.index.map_size, interval_s, stop, count),
                       name="bench-republish", daemon=True)
    proc.start()
    try:
        yield state
    finally:
        stop.set()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
        state["versions"] = int(count.value)


def _republish(index_path: str, map_size: int, interval_s: float, stop, count) -> None:
    """Child of :func:`republishing`: the index's query model under versions +1, +2, ... every ``interval_s``."""
    from mfli.config import IndexSettings
    from mfli.storage.index.reader import LmdbIndex
    from mfli.storage.index.writer import IndexWriter

    path = Path(index_path)
    writer = IndexWriter(path, IndexSettings(path=path, map_size=map_size), auto_bootstrap=False)
    try:
        with LmdbIndex(path, env=writer.env).view() as view:
            model = view.query_model()
        if model is None or not model.weights:
            return
        version = model.version
        while not stop.wait(interval_s):
            version += 1
            writer.apply(None, {}, models=[dc_replace(model, version=version)])
            with count.get_lock():
                count.value += 1
    finally:
        writer.close()


def start_server(root: Path, settings, *extra_args: str, ready_timeout_s: float = 900.0
                 ) -> tuple[subprocess.Popen, str]:
    """A real one-worker ``mfli serve`` on a free loopback port over ``root``'s index and users store,
    returned once ``/readyz`` answers 200 (it is killed if it dies or is not ready within ``ready_timeout_s``:
    at 10^6 items on a loaded box the mirror's first load and the kernels' warm-up took over two minutes)."""
    port = free_port()
    env = {**os.environ, "MFLI_INDEX__PATH": str(root / "index.lmdb"),
           "MFLI_LEARNER__USERS_PATH": str(root / "users.lmdb"),
           "MFLI_INDEX__MAP_SIZE": str(settings.index.map_size), "MFLI_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "mfli.orchestration.cli", "serve", "--workers", "1",
                             "--port", str(port),
                             *extra_args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    if wait_http(f"{base}/readyz", ready_timeout_s, alive=lambda: proc.poll() is None):
        return proc, base
    proc.kill()
    raise RuntimeError(f"mfli serve did not become ready: {proc.stderr.read().decode()[-2000:]}")


_WRK_SCRIPT = """
math.randomseed(1)
request = function()
  return wrk.format("GET", "/v1/recommend?user_id=u" .. math.random(0, %d) .. "&k=%d")
end
%s
"""


def _wrk(base: str, script: Path, connections: int, seconds: int, core: str | None) -> str:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), base]
    if core is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", core, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _requests(text: str) -> int:
    m = re.search(r"(\d+) requests in", text)
    return int(m.group(1)) if m else 0


def server_cpu(root: Path, settings, users: int, k: int, seconds: int, connections: int = 8) -> dict:
    """Server CPU per request under saturating load, and p50/p99 at about half that rate."""
    proc, base = start_server(root, settings, "--no-monitor")
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    try:
        if pinned:
            subprocess.run(["taskset", "-a", "-p", "-c", "1", str(proc.pid)], capture_output=True, check=False)
        script = root / "cpu.lua"
        script.write_text(_WRK_SCRIPT % (users - 1, k, ""))
        _wrk(base, script, connections, 2, "0" if pinned else None)  # warm-up
        runs = []
        for _ in range(3):
            c0 = process_cpu(proc.pid)
            out = _wrk(base, script, connections, seconds, "0" if pinned else None)
            cpu = process_cpu(proc.pid) - c0
            n = _requests(out)
            runs.append({"cpu_per_request_s": cpu / max(n, 1), **parse_wrk(out)})
            log.info("server: %d requests, %.3f ms CPU each, %.0f req/s", n, 1e3 * cpu / max(n, 1), runs[-1]["rps"])
        rps = sorted(r["rps"] for r in runs)[len(runs) // 2]
        # half the saturating rate: 4 connections, each pausing so that together they ask rps / 2
        delay_ms = max(0.0, 4 / (rps / 2) * 1e3 - 1e3 / rps)
        half = root / "half.lua"
        half.write_text(_WRK_SCRIPT % (users - 1, k, f"function delay() return {delay_ms:.3f} end"))
        light = [parse_wrk(_wrk(base, half, 4, seconds, "0" if pinned else None)) for _ in range(3)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"runs": runs, "half_rate": light, "saturating_rps": rps, "pinned": pinned}
