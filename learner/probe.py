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
from mfli.retrieval.query_model import combine

MISS = 1 << 30  # rank of an event that cannot be scored (new user, new item)


class PrequentialProbe:
    """Appends ``{"id", "user", "rank"}`` per event to ``path`` (rank = live items scored above it)."""

    def __init__(self, path: Path, rank_label: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out: IO[str] = self.path.open("a", encoding="utf-8")
        self._seen: dict[str, set[str]] = {}  # user -> item ids engaged with (the exclusion set)
        self.rank_label = rank_label

    def score(self, learner: MFLILearner, event_ids: list[str], user_ids: list[str], item_ids: list[str],
              ts: np.ndarray) -> np.ndarray:
        """Ranks of the events (in order) under the learner's current model; then remembers them as seen."""
        n = len(event_ids)
        ranks = np.full(n, MISS, dtype=np.int64)
        items = np.asarray([learner.items.ids.get(i) if i in learner.items.ids else -1 for i in item_ids], np.int64)
        known_user = np.asarray([u in learner.users.users for u in user_ids], dtype=bool)
        # each event's window as the step will see it (earlier events of the same batch included)
        user_rows = np.asarray([learner.users.users.get(u) if k else -1 for u, k in zip(user_ids, known_user,
                                                                                      strict=True)], np.int64)
        sel = np.flatnonzero(known_user & (items >= 0))
        row_of: dict[int, int] = {}
        if len(sel):
            win, win_ts, has = learner.users.advance_windows(user_rows[sel], items[sel], ts[sel], commit=False)
            n_items = len(learner.items)
            win, win_ts = learner.users.keep_only(win, win_ts, learner.items.live[np.maximum(win, 0)])
            has &= win[:, -1] >= 0
            ok = sel[has]
            if len(ok):
                q, g = learner.window_queries(win[has], win_ts[has])
                vec = learner.items.vectors().numpy()
                facet = np.einsum("bfd,nfd->bnf", q, vec)
                scores = combine(facet, g[:, None, :], learner.settings.temperature) + learner.prior()[None, :]
                scores[:, ~learner.items.live[:n_items]] = -np.inf
                tgt = items[ok]
                t = scores[np.arange(len(ok)), tgt]
                above = (scores > t[:, None]).sum(axis=1)
                row_of = {int(i): r for r, i in enumerate(ok.tolist())}
        ids = learner.items.ids
        for i in range(n):
            seen = self._seen.setdefault(user_ids[i], set())
            r = row_of.get(i)
            if r is not None:
                ex = np.fromiter((ids.get(x) for x in seen if x != item_ids[i] and x in ids), np.int64)
                ranks[i] = above[r] - int((scores[r, ex] > t[r]).sum()) if ex.size else above[r]
            seen.add(item_ids[i])
            self._out.write(json.dumps({"id": event_ids[i], "user": user_ids[i], "rank": int(ranks[i]),
                                        "r": self.rank_label}) + "\n")
        self._out.flush()
        return ranks

    def score_events(self, learner: MFLILearner, events: list) -> np.ndarray:
        """:meth:`score` for validated ``InteractionEvent`` objects."""
        return self.score(learner, [e.event_id for e in events], [e.user_id for e in events],
                          [e.item_id for e in events], np.asarray([e.ts for e in events], dtype=np.int64))

    def close(self) -> None:
        self._out.close()
