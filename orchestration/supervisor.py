"""Run mfli processes as supervised children: the demo and the chaos run both use this.

Each child is ``python -m mfli.orchestration.cli <command> …`` in its own process group with its own
log file, so a crash is *reported* (exit status and the log's tail) rather than hidden, and a stop
reaches the child's own children too. The supervisor never restarts a child on its own: the demo
reports a crash and the chaos run decides when to restart what it killed.

Children die with the supervisor even when it is SIGKILLed and cannot stop them (the kernel sends
them SIGKILL, :func:`mfli.lifecycle.die_with_parent`): every process is crash-safe by design, and a
leftover learner or server would hold its ports and files against the next run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mfli.lifecycle import die_with_parent

log = logging.getLogger(__name__)


@dataclass
class Child:
    """One supervised ``mfli`` subcommand."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    reported: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mfli.orchestration.cli", *self.argv], env=self.env, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGKILL),
        )
        out.close()
        self.starts += 1
        log.info("started %s (pid %d): mfli %s", self.name, self.proc.pid, " ".join(self.argv))

    def kill(self) -> None:
        """SIGKILL the whole process group: the crash the reliability suite injects."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.kills += 1

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait ``grace_s``, then SIGKILL. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, grace_s)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def pipeline_env(state: Path, bootstrap: str, fast_groups: bool = True, **overrides: str) -> dict[str, str]:
    """Environment for learner/indexer/server children sharing one state directory and one broker.

    ``fast_groups`` sets the small group timeouts that keep joins near 1.5 s on the embedded broker
    (docs/design.md §Kafka and the embedded broker); ``overrides`` are further ``MFLI_*`` variables.
    """
    env = {
        **os.environ, "MFLI_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "MFLI_DATA_DIR": str(state),
        "MFLI_LEARNER__CHECKPOINT_DIR": str(state / "learner"), "MFLI_LEARNER__USERS_PATH": str(state / "users.lmdb"),
        "MFLI_INDEX__PATH": str(state / "index.lmdb"), "PYTHONUNBUFFERED": "1",
    }
    if fast_groups:
        env.update(MFLI_KAFKA__SESSION_TIMEOUT_MS="3000", MFLI_KAFKA__HEARTBEAT_INTERVAL_MS="500")
    env.update(overrides)
    return env


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks stop the children (and the embedded
    broker): they run in their own sessions, so nobody else would, and they would outlive us."""

    def _raise(signum: int, _frame: object) -> None:
        for sup in list(Supervisor.running):
            sup.stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


class Supervisor:
    """Starts children, notices crashes, stops everything in reverse order."""

    #: supervisors with children that may be alive (stopped by :func:`exit_on_sigterm`'s handler)
    running: list[Supervisor] = []

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        Supervisor.running.append(self)
        self.log_dir = log_dir
        self.env = dict(env)
        self.children: dict[str, Child] = {}

    def add(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        child = Child(name, list(argv), {**self.env, **(env or {})}, self.log_dir / f"{name}.log")
        self.children[name] = child
        return child

    def start_all(self) -> None:
        for child in self.children.values():
            child.start()

    def crashed(self) -> list[Child]:
        """Children that exited since the last call (each exit reported once)."""
        out = []
        for child in self.children.values():
            if child.proc is not None and child.proc.poll() is not None and child.starts not in child.reported:
                child.reported.add(child.starts)
                out.append(child)
        return out

    def stop_all(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()
        if self in Supervisor.running:
            Supervisor.running.remove(self)


def scrape(url: str, timeout_s: float = 1.0) -> dict[str, float]:
    """``{"name{label=value,…}": value}`` from a Prometheus text endpoint; empty if unreachable."""
    try:
        text = httpx.get(url, timeout=timeout_s).text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def wait_http(url: str, timeout_s: float, ok: Sequence[int] = (200,),
              alive: Callable[[], bool] | None = None) -> bool:
    """Poll ``url`` until it answers with one of ``ok``; False once the timeout passes or ``alive()`` says
    the process that should answer has died (no point waiting out the deadline for a corpse). Connection
    errors mean "not listening yet"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (alive is None or alive()):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code in ok:
                return True
        time.sleep(0.2)
    return False
