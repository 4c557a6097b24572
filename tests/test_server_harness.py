"""Real servers for the tests: the app on uvicorn in a background thread (:func:`running`), or the real
``mfli serve`` subprocess over LMDB stores (:func:`serve_process`), both on a free loopback port.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

from mfli.lifecycle import free_port


@contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port>; yields the base URL; stops the server on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop="asyncio", http="httptools", lifespan="on", log_level="warning",
                            access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("in-process server did not start")
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_http(url: str, timeout_s: float = 30.0, status: int = 200) -> httpx.Response:
    """Poll ``url`` until it answers ``status`` (a subprocess server starting up)."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(url, timeout=2)
            if resp.status_code == status:
                return resp
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer {status} within {timeout_s}s (last error: {last})")


@contextmanager
def serve_process(index: Path, users: Path, map_size: int, wait_path: str = "/readyz",
                  timeout_s: float = 60.0) -> Iterator[httpx.Client]:
    """``mfli serve`` (one worker) over ``index``/``users``; yields a client once ``wait_path`` answers 200.
    On exit the server must stop cleanly and never have logged a traceback."""
    port = free_port()
    env = {**os.environ, "MFLI_INDEX__PATH": str(index), "MFLI_INDEX__MAP_SIZE": str(map_size),
           "MFLI_LEARNER__USERS_PATH": str(users), "MFLI_SERVE__PORT": str(port), "MFLI_LOG_LEVEL": "WARNING",
           "MFLI_SERVE__RECALL_SAMPLE_INTERVAL_S": "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "mfli.orchestration.cli", "serve", "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}{wait_path}", timeout_s=timeout_s)
        with httpx.Client(base_url=base, timeout=30) as client:
            yield client
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode(errors="replace")
        # uvicorn re-raises SIGTERM after a graceful shutdown, so -SIGTERM is a clean exit too
        assert proc.returncode in (0, -15), out[-2000:]
        assert "Traceback" not in out, out[-3000:]
