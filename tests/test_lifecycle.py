"""Nothing outlives its supervisor: children started by :class:`~mfli.orchestration.supervisor.Supervisor`
(the demo's and the chaos run's learner, indexer, server and producer) and the embedded broker die when
the process that started them is SIGKILLed, which gives it no chance to stop them itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mfli.lifecycle import stop_on_signals

# A supervisor in miniature, as the demo runs it: an embedded broker and a supervised `mfli broker`
# child (a long-running mfli command that needs nothing else and has a child of its own, its broker),
# started from the main thread; prints the pids (broker, child, the child's broker) and waits.
PARENT = """
import glob, os, sys, time
from pathlib import Path
from mfli.kafka.broker import EmbeddedBroker
from mfli.orchestration.supervisor import Supervisor
state = Path(sys.argv[1])
broker = EmbeddedBroker(log_path=state / "broker.log").start()
sup = Supervisor(state, os.environ)
child = sup.add("broker-cmd", ["broker", "--no-topics"])
sup.start_all()
deadline = time.monotonic() + 60
while "127.0.0.1:" not in child.log_tail() and time.monotonic() < deadline:
    time.sleep(0.1)
grandchildren = [int(p) for f in glob.glob(f"/proc/{child.pid}/task/*/children") for p in open(f).read().split()]
print(broker.pid, child.pid, *grandchildren, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it has died)."""
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux-only")
def test_children_and_the_broker_die_when_the_supervisor_is_sigkilled(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        pids = [int(p) for p in line.split()]
        assert len(pids) == 3, f"parent printed {line!r} (broker, child, the child's broker expected)"
        assert all(_alive(p) for p in pids), "broker and child should run while the supervisor does"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [p for p in pids if _alive(p)]
        assert survivors == [], f"processes outlived their SIGKILLed supervisor: {survivors}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in pids:  # only if the assertion failed: do not leak them into other tests
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_stop_on_signals_turns_sigterm_into_an_event() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop = stop_on_signals([signal.SIGTERM])
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_single_writer_lock_waits_for_its_holder_to_exit_then_refuses_a_live_one(tmp_path: Path) -> None:
    """``take_single_writer_lock(wait_s=...)``: a learner rank's successor waits for the predecessor still
    writing its final checkpoint (here a process holding the lock for 1 s), and a holder that stays past the
    wait gets the clear refusal, not a second writer."""
    from mfli.lifecycle import take_single_writer_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from mfli.lifecycle import take_single_writer_lock; "
        f"fh = take_single_writer_lock(Path({str(tmp_path)!r}), 'rank-0.lock', 'rank 0'); "
        "print('held', flush=True); time.sleep(float(sys.argv[1]))"), "1.0"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match="another rank 0 already writes"):
            take_single_writer_lock(tmp_path, "rank-0.lock", "rank 0")  # no wait: refused at once
        t0 = time.monotonic()
        fh = take_single_writer_lock(tmp_path, "rank-0.lock", "rank 0", wait_s=30)
        waited = time.monotonic() - t0
        assert holder.wait(timeout=10) == 0
        assert 0.2 < waited < 10, waited
        assert (tmp_path / "rank-0.lock").read_text() == str(os.getpid())
        fh.close()
    finally:
        holder.kill()
