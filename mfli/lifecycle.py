"""How every mfli process starts, stops and dies: one home for the signal and port plumbing.

* :func:`stop_on_signals`: SIGINT/SIGTERM set an event that the main loop checks between rounds, so a
  process finishes the round it is in (a learner writes its final checkpoint, the indexer commits its
  transaction) instead of dying mid-write. The learner, the indexer, the demo and the foreground broker
  use it (uvicorn handles the server's signals).
* :func:`die_with_parent`: a ``preexec_fn`` that makes a child process receive a signal when the
  process that started it dies, even by SIGKILL (which leaves no chance to stop children). The demo,
  the chaos run and the embedded broker use it so nothing outlives its supervisor.
* :func:`free_port`: a loopback TCP port for a child to listen on.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_on_signals(signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> threading.Event:
    """An event set when one of ``signals`` arrives (install from the main thread, before the loop)."""
    stop = threading.Event()
    for sig in signals:
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


def set_parent_death_signal(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask Linux to send ``sig`` to *this* process when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
    False where that does not exist. ``parent``: the pid the caller expects as its parent; if it is
    already gone (it died before the ``prctl``), ``sig`` is sent at once."""
    prctl = _prctl()
    if prctl is None:
        return False
    prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``subprocess.Popen(preexec_fn=...)`` that makes the child receive ``sig`` when the process
    starting it dies, even by SIGKILL; None where that does not exist (not Linux).

    Why: children started in their own session (so a Ctrl-C reaches only the supervisor, which then
    stops them in order) are not reached by the terminal's signals, and a supervisor killed with
    SIGKILL cannot stop them itself. The kernel can.

    Caveats the callers accept: the signal fires when the *thread* that started the child exits, so
    start children from a thread that lives as long as they should (the main thread, in mfli); and a
    parent that died between ``fork`` and the ``prctl`` is caught by comparing the parent pid.
    """
    if _prctl() is None:
        log.debug("prctl is not available; children will not die with their parent")
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child between fork and exec: no allocation-heavy work, no locks.
        set_parent_death_signal(sig, parent)

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the OS picks it; a race with other binders is possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(n: int, tries: int = 200) -> int:
    """The first of ``n`` consecutive TCP ports on 127.0.0.1 free right now: a learner group's ranks on one
    machine serve metrics on ``metrics_port + rank`` (learner/group.py)."""
    for _ in range(tries):
        first = free_port()
        if first + n > 65536:
            continue
        socks = []
        try:
            for p in range(first, first + n):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports found in {tries} tries")


def take_single_writer_lock(directory: Path, lock_name: str, what: str, wait_s: float = 0.0) -> IO[str]:
    """An exclusive ``flock`` on ``directory/lock_name`` holding our pid, kept for the process's life.

    LMDB allows one writer transaction at a time but not two writer *processes* that each believe they
    own the offsets stored beside the data; the indexer and a replica's applier take this at start and
    exit with a clear message when another process holds it. ``wait_s``: first wait that long for the
    holder to exit (a learner rank whose predecessor is still writing its final checkpoint). Returns the
    open file (keep a reference: closing it releases the lock)."""
    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / lock_name, "a+")  # noqa: SIM115 - held open for the process's life
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            fh.close()
            raise SystemExit(f"another {what} already writes {directory}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh
