"""Prequential probe: score each event the learner reads *before* it learns it, from the live stream.

Why in the learner. ``mfli eval`` replays a log in memory; a learner group (``mfli learn --workers N``)
reads the events through Kafka, split by partition owner, batched by whatever each poll returns. To
know whether N ranks learn as well as one, the same protocol must run on what the processes really
see: every event is ranked against every live item by the model as it stands before the step that
learns it (exact scoring, the user's earlier items excluded, as in ``mfli eval``'s ``exact`` column),
and one line per event is appended to a JSON-lines file. ``mfli eval compare-probes A B`` (see
:mod:`mfli.evaluation.probes`) pairs two such files by event id and reports HR@K with a paired
bootstrap interval over users.

The probe is off by default (``learner.probe_path``): it costs one ``[batch, items]`` product per step
and a set of seen items per user.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO

import numpy as np

from mfli.learner.learner import MFLILearner
from mfli.retrieval.base import target_ranks
from mfli.retrieval.query_model import combine

MISS = 1 << 30  # rank of an event that cannot be scored (new user, new item)


class PrequentialProbe:
    """Appends ``{"id", "user", "rank"}`` per event to ``path`` (rank = live items scored above it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[str] = self.path.open("a", encoding="utf-8")
        self._seen: dict[str, set[str]] = {}  # user -> item ids engaged with (the exclusion set)
        # user -> their events (item id, ts), oldest first: the probe's own histories, so a user's second
        # event in a batch is scored with the first in its window even if the learner has not seen the user
        self._hist: dict[str, list[tuple[str, int]]] = {}

    def score(self, learner: MFLILearner, event_ids: list[str], user_ids: list[str], item_ids: list[str],
              ts: np.ndarray) -> np.ndarray:
        """Ranks of the events (in order) under the learner's current model (every event's window holds
        the user's earlier events, including earlier ones in this batch); then remembers them."""
        n = len(event_ids)
        h = learner.settings.history
        ids, live = learner.items.ids, learner.items.live
        ranks = np.full(n, MISS, dtype=np.int64)
        win = np.full((n, h), -1, dtype=np.int64)
        win_ts = np.zeros((n, h), dtype=np.int64)
        target = np.full(n, -1, dtype=np.int64)
        excluded: list[np.ndarray] = []
        for i in range(n):
            hist = self._hist.setdefault(user_ids[i], [])
            rows = [(r, t) for x, t in hist if x in ids and live[r := ids.get(x)]][-h:]
            if rows:
                win[i, h - len(rows):] = [r for r, _ in rows]
                win_ts[i, h - len(rows):] = [t for _, t in rows]
            if item_ids[i] in ids:
                target[i] = ids.get(item_ids[i])
            seen = self._seen.setdefault(user_ids[i], set())
            excluded.append(np.fromiter((ids.get(x) for x in seen if x != item_ids[i] and x in ids), np.int64))
            seen.add(item_ids[i])
            hist.append((item_ids[i], int(ts[i])))
            if len(hist) > 4 * h:  # deleted items are dropped from windows, so keep some slack
                del hist[: len(hist) - 2 * h]
        ok = np.flatnonzero((win[:, -1] >= 0) & (target >= 0))
        if len(ok):
            q, g = learner.window_queries(win[ok], win_ts[ok])
            vec = learner.serving_vectors()
            facet = np.einsum("bfd,nfd->bnf", q, vec)
            scores = combine(facet, g[:, None, :], learner.settings.score_tau) + learner.prior()[None, :]
            scores[:, ~live[: len(learner.items)]] = -np.inf
            ranks[ok], _ = target_ranks(scores, target[ok], [excluded[i] for i in ok.tolist()])
        for i in range(n):
            self._out.write(json.dumps({"id": event_ids[i], "user": user_ids[i], "rank": int(ranks[i])}) + "\n")
        self._out.flush()
        return ranks

    def score_events(self, learner: MFLILearner, events: list) -> np.ndarray:
        """:meth:`score` for validated ``InteractionEvent`` objects."""
        return self.score(learner, [e.event_id for e in events], [e.user_id for e in events],
                          [e.item_id for e in events], np.asarray([e.ts for e in events], dtype=np.int64))

    def close(self) -> None:
        self._out.close()
