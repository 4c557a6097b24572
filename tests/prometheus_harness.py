"""A real Prometheus server (the Debian binary) for tests, on a free loopback port.

Why a real server and not a parser of ``/metrics`` text: what users and alert rules see is what
Prometheus stored after a scrape, with its own name mangling (``_total``, ``_bucket``), staleness and
PromQL semantics. The end-to-end tests assert through the same HTTP query API a dashboard uses.

Usage::

    with PrometheusHarness({"learner": ["127.0.0.1:9101"]}, workdir=tmp_path) as prom:
        prom.wait_until_up("learner")
        value = prom.scalar('sum(mfli_events_consumed_total)')

``.ci/run`` installs the binary (``deploy/scripts/install-prometheus.sh``); use
:func:`require_prometheus` in a test to skip on a developer machine without it but fail under CI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `bash deploy/scripts/install-prometheus.sh` (Debian package 'prometheus')"


def find_binary(name: str) -> str | None:
    """Path of ``prometheus`` or ``promtool`` on PATH, or None."""
    return shutil.which(name)


def require_prometheus(name: str = "prometheus") -> str:
    """Return the binary's path; skip the test if it is absent, except under CI where that is a failure.

    CI installs the package in ``.ci/run``, so a missing binary there means the install step broke and a
    silent skip would hide it.
    """
    import pytest

    path = find_binary(name)
    if path is None:
        message = f"`{name}` not found on PATH; {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the caller must still cope with losing a race for it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrometheusError(RuntimeError):
    """Prometheus failed to start, died, or answered a query with an error."""


class PrometheusHarness:
    """Start, query and stop one Prometheus server scraping the given targets.

    ``targets`` maps a job name to ``host:port`` strings. ``scrape_interval`` defaults to 1 s so a test
    sees a value within a couple of seconds of a target exposing it. ``rule_files`` are loaded as-is, so
    a test can also check that the project's alert rules evaluate against live data.
    """

    def __init__(
        self,
        targets: Mapping[str, Sequence[str]],
        workdir: Path,
        *,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        binary: str | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        if not targets:
            raise ValueError("targets must name at least one job")
        self.targets = {job: list(addrs) for job, addrs in targets.items()}
        self.workdir = Path(workdir)
        self.scrape_interval = scrape_interval
        self.rule_files = [Path(p).resolve() for p in rule_files]
        self.binary = binary or find_binary("prometheus")
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = self.workdir / "prometheus.log"

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if self.port is None:
            raise PrometheusError("Prometheus is not started")
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        """Write prometheus.yml for the targets; returned so a test can also ``promtool check`` it."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "scrape_configs": [
                {
                    "job_name": job,
                    "scrape_interval": self.scrape_interval,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": addrs}],
                }
                for job, addrs in self.targets.items()
            ],
        }
        if self.rule_files:
            config["rule_files"] = [str(p) for p in self.rule_files]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def start(self, attempts: int = 3) -> PrometheusHarness:
        """Start the server and wait until ``/-/ready``; retry on another port if the port was taken."""
        if self.binary is None:
            raise PrometheusError(f"prometheus binary not found; {INSTALL_HINT}")
        config = self.write_config()
        last_error: Exception | None = None
        for attempt in range(attempts):
            self.port = free_port()
            data_dir = self.workdir / f"data-{attempt}"
            cmd = [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data_dir}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ]
            log.info("starting %s", " ".join(cmd))
            with open(self._log_path, "ab") as logf:
                # Own session: a Ctrl-C on the test run must not reach it before we stop it in order.
                self._proc = subprocess.Popen(
                    cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
                )
            try:
                self._wait_ready()
                log.info("prometheus ready at %s (pid %d)", self.url, self._proc.pid)
                return self
            except PrometheusError as exc:
                last_error = exc
                self.stop()
                log.warning("prometheus start attempt %d failed: %s", attempt + 1, exc)
        raise PrometheusError(f"prometheus did not start after {attempts} attempts: {last_error}")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"exited with rc {self._proc.returncode}; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"not ready within {self.start_timeout_s} s; log tail:\n{self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (Prometheus flushes its head block), then SIGKILL after ``grace_s``. Safe to repeat."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            log.warning("prometheus pid %d ignored SIGTERM for %.0f s; killing", proc.pid, grace_s)
            proc.kill()
            proc.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> PrometheusHarness:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- HTTP API ----------------------------------------------------------------------------------
    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``; raise PrometheusError on an error status."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; returns the vector as ``[{"metric": {...}, "value": float}, ...]``.

        A scalar result becomes a one-element list with an empty ``metric``.
        """
        data = self.api("query", {"query": promql})
        if data["resultType"] == "vector":
            return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": float(data["result"][1])}]
        raise PrometheusError(f"unsupported result type {data['resultType']} for {promql!r}")

    def scalar(self, promql: str) -> float | None:
        """The single value of an expression that yields at most one series (None when empty)."""
        result = self.query(promql)
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series; expected at most one")
        return result[0]["value"] if result else None

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 20.0,
        interval_s: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Poll ``query(promql)`` until ``predicate(result)`` holds; raise with the last result if not."""
        deadline = time.monotonic() + timeout_s
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            if not self.running:
                raise PrometheusError(f"prometheus died; log tail:\n{self.log_tail()}")
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(interval_s)
        raise PrometheusError(f"timed out after {timeout_s} s waiting on {promql!r}; last result: {result}")

    def wait_until_up(self, job: str, timeout_s: float = 20.0) -> None:
        """Wait until every target of ``job`` has been scraped successfully (``up == 1``)."""
        expected = len(self.targets[job])
        self.wait_for(
            f'up{{job="{job}"}} == 1', lambda r: len(r) == expected, timeout_s=timeout_s
        )

    def targets_health(self) -> list[dict[str, Any]]:
        """Active targets as Prometheus reports them (job, health, lastError): handy in assertion messages."""
        return [
            {"job": t["labels"].get("job"), "health": t["health"], "lastError": t.get("lastError", "")}
            for t in self.api("targets")["activeTargets"]
        ]
