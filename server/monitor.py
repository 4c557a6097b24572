"""Live quality gauges: sampled index recall vs exact, and prequential recall (docs/design.md §Observability).

How the server learns of new events cheaply: it does not consume Kafka. It remembers the users it served
recently (a bounded LRU filled by the request path at the cost of one dict write), and a background thread
wakes every ``serve.recall_sample_interval_s``. When the users store's version has not moved since the last
tick, the tick is free. Otherwise it re-reads the histories of the tracked users (one LMDB get each): for a
user whose history gained items since the last look, each new item counts as a hit for the *index* if it
was in the top-k we would have served them just before (computed at the previous look from the previous
history), and as a hit for *popularity* if it was in the decayed-popularity top-k (trending, seen items
excluded) at that time. Then the "would have served" sets are recomputed from the new history.

Index recall: each tick, a few tracked users get both the index answer and the exact answer;
recall@k = |index ∩ exact| / |exact|. Both gauges are means over a sliding window of recent checks.

With several workers, each process has its own LRU; only the worker holding an exclusive ``flock`` on
``lock_path`` samples, so the gauges are not computed (and exported) once per worker.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfli.config import Settings
from mfli.metrics import INDEX_RECALL, PREQUENTIAL_RECALL

from .state import ReadState, StateSource

log = logging.getLogger(__name__)


@dataclass
class _Look:
    """What we would have served a user at their last-seen history."""

    newest_ts: int
    length: int
    index: set[int]
    popularity: set[int]


class Monitor:
    """Background sampler; :meth:`served` is the only call on the request path."""

    def __init__(self, settings: Settings, source: StateSource, service, lock_path: Path | None = None) -> None:
        self.cfg = settings.serve
        self.source = source
        self.service = service
        self.lock_path = lock_path
        self.k = self.cfg.default_k
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._looks: dict[str, _Look] = {}
        self._users_version: int | None = None
        self.hits: dict[str, deque[bool]] = {
            s: deque(maxlen=self.cfg.prequential_window) for s in ("index", "popularity")
        }
        self.recalls: deque[float] = deque(maxlen=self.cfg.recall_window)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._rng = random.Random(0)

    # --- request path ---------------------------------------------------------------------------------
    def served(self, user_id: str, answer: dict) -> None:
        recent = self._recent
        if user_id in recent:
            recent.move_to_end(user_id)
        else:
            recent[user_id] = None
            if len(recent) > self.cfg.monitor_users:
                recent.popitem(last=False)

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.lock_path is not None:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                log.info("another worker samples recall; this one (pid %d) does not", os.getpid())
                return
            self._lock_fd = fd
        self._thread = threading.Thread(target=self._loop, name="mfli-recall-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.recall_sample_interval_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a sampler bug must never take the server down
                log.exception("recall sampler tick failed")

    # --- one sampling round ---------------------------------------------------------------------------
    def tick(self) -> None:
        """Update both gauges from the users served recently (public so tests can drive it)."""
        if not self.source.ready()[0]:
            return
        users = list(self._recent)  # copy: the request path keeps appending
        version = self.source.users_version()
        with self.source.read() as state:
            if version != self._users_version:
                self._prequential(state, users)
                self._users_version = version
            self._index_recall(state, users)

    def _prequential(self, state: ReadState, users: list[str]) -> None:
        budget = self.cfg.monitor_users_per_tick
        for user in users:
            found = state.history(user)
            if found is None or found[0].size == 0:
                continue
            rows, ts = found
            newest = int(ts[-1]) if ts.size else 0
            look = self._looks.get(user)
            if look is not None and (newest, rows.size) == (look.newest_ts, look.length):
                continue
            if look is not None:
                fresh = rows[ts > look.newest_ts] if ts.size == rows.size else rows[-1:]
                for row in fresh.tolist():
                    self.hits["index"].append(row in look.index)
                    self.hits["popularity"].append(row in look.popularity)
            if budget <= 0:
                self._looks.pop(user, None)  # re-looked next tick; never measured against a stale look
                continue
            budget -= 1
            self._looks[user] = self._look(state, rows, ts, newest)
        for user in list(self._looks):
            if user not in self._recent:
                del self._looks[user]
        for source, window in self.hits.items():
            if window:
                PREQUENTIAL_RECALL.labels(source).set(sum(window) / len(window))

    def _look(self, state: ReadState, rows: np.ndarray, ts: np.ndarray, newest: int) -> _Look:
        index = self.service.rows_for(state, rows, self.k, "index", ts)
        popular = state.view.trending(self.k + rows.size)
        popular = popular[~np.isin(popular, rows)][: self.k]
        return _Look(newest, int(rows.size), set(index.tolist()), set(popular.tolist()))

    def _index_recall(self, state: ReadState, users: list[str]) -> None:
        if not users or self.cfg.recall_sample_users <= 0:
            return
        for user in self._rng.sample(users, min(len(users), self.cfg.recall_sample_users)):
            found = state.history(user)
            if found is None or found[0].size == 0:
                continue
            exact = self.service.rows_for(state, found[0], self.k, "exact", found[1])
            if exact.size == 0:
                continue
            index = self.service.rows_for(state, found[0], self.k, "index", found[1])
            self.recalls.append(np.intersect1d(index, exact).size / exact.size)
        if self.recalls:
            INDEX_RECALL.labels(str(self.k)).set(sum(self.recalls) / len(self.recalls))
