"""The learner's item side: growable embedding table, row-wise Adagrad state, tags, live mask, codes.

Tables grow by doubling so that a new item costs amortised O(1) and row numbers never move. Embedding
rows are kept L2-normalised per facet (re-projected after every update), so the row-wise Adagrad step
size means the same thing for every item and the table *is* what retrievers score.
"""

from __future__ import annotations

import numpy as np
import torch

from mfli.learner.ids import IdMap


class ItemCatalogue:
    """Rows, vectors ``[cap, F*d]`` and per-row state of every item the learner has seen."""

    def __init__(self, facets: int, dim: int, levels: int, capacity: int = 1024, context: bool = False,
                 average: bool = False) -> None:
        self.facets, self.dim, self.levels = facets, dim, levels
        # optional moving average of ``emb`` (``model.serving_average``): what is published and indexed
        self.avg = torch.zeros(capacity if average else 0, facets * dim)
        # optional separate input table of the query encoder (``encoder_input='separate'``) and its Adagrad
        self.ctx = torch.zeros(capacity if context else 0, facets * dim)
        self.ctx_acc = torch.zeros(capacity if context else 0)
        self.ids = IdMap()
        self.emb = torch.zeros(capacity, facets * dim)
        self.acc = torch.zeros(capacity)  # row-wise Adagrad accumulator (mean squared gradient)
        self.codes = torch.zeros(capacity, facets, levels, dtype=torch.int64)
        self.live = np.zeros(capacity, dtype=bool)
        self.tags: list[list[int]] = []  # tag ids per row
        self.tag_names = IdMap()
        self.tag_rows: list[list[int]] = []  # rows carrying each tag (for cold start and 'semantic')

    def __len__(self) -> int:
        return len(self.ids)

    def _grow(self, size: int) -> None:
        cap = self.emb.shape[0]
        if size <= cap:
            return
        while cap < size:
            cap *= 2
        n = self.emb.shape[0]
        emb = torch.zeros(cap, self.emb.shape[1])
        emb[:n] = self.emb
        acc = torch.zeros(cap)
        acc[:n] = self.acc
        codes = torch.zeros(cap, self.facets, self.levels, dtype=torch.int64)
        codes[:n] = self.codes
        live = np.zeros(cap, dtype=bool)
        live[:n] = self.live
        self.emb, self.acc, self.codes, self.live = emb, acc, codes, live
        if self.ctx.shape[0]:
            ctx, ctx_acc = torch.zeros(cap, self.ctx.shape[1]), torch.zeros(cap)
            ctx[:n], ctx_acc[:n] = self.ctx, self.ctx_acc
            self.ctx, self.ctx_acc = ctx, ctx_acc
        if self.avg.shape[0]:
            avg = torch.zeros(cap, self.avg.shape[1])
            avg[:n] = self.avg
            self.avg = avg

    def rows_for(self, item_ids: list[str], gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``item_ids``; unseen ids get rows (random start) and become live."""
        rows, new = self.ids.add(item_ids)
        if len(new):
            self._grow(len(self.ids))
            self.tags.extend([] for _ in range(len(new)))
            self._init_rows(torch.from_numpy(new), gen)
            self.live[new] = True
        return rows, new

    def set_tags(self, row: int, tags: list[str], gen: torch.Generator, content_start: bool) -> None:
        """Attach tags to a row; ``content_start`` re-initialises it from the tags' current centroids."""
        tag_rows, _ = self.tag_names.add(tags)
        for _ in range(len(self.tag_names) - len(self.tag_rows)):
            self.tag_rows.append([])
        if content_start:
            self._init_from_tags(row, tag_rows.tolist(), gen)
        for t in tag_rows.tolist():
            if t not in self.tags[row]:
                self.tag_rows[t].append(row)
        self.tags[row] = sorted(set(self.tags[row]) | set(tag_rows.tolist()))

    @torch.no_grad()
    def _init_rows(self, rows: torch.Tensor, gen: torch.Generator) -> None:
        self.emb[rows] = self.normalise(torch.randn(len(rows), self.facets * self.dim, generator=gen))
        self.acc[rows] = 0
        if self.avg.shape[0]:
            self.avg[rows] = self.emb[rows]
        if self.ctx.shape[0]:
            self.ctx[rows] = self.normalise(torch.randn(len(rows), self.facets * self.dim, generator=gen))
            self.ctx_acc[rows] = 0

    @torch.no_grad()
    def _init_from_tags(self, row: int, tags: list[int], gen: torch.Generator, sample: int = 64) -> None:
        """Cold start: mean of the tags' centroids (up to ``sample`` most recent members each) + noise."""
        cents = []
        for t in tags:
            members = [r for r in self.tag_rows[t][-sample:] if r != row and self.live[r]]
            if members:
                cents.append(self.emb[members].mean(dim=0))
        noise = torch.randn(self.facets * self.dim, generator=gen)
        if cents:
            start = self.normalise(torch.stack(cents).mean(dim=0, keepdim=True))[0]
            self.emb[row] = self.normalise((start + 0.2 * self.normalise(noise[None])[0])[None])[0]
        else:
            self.emb[row] = self.normalise(noise[None])[0]
        if self.avg.shape[0]:
            self.avg[row] = self.emb[row]

    @torch.no_grad()
    def average(self, rows: torch.Tensor, decay: float) -> None:
        """Move the rows' moving average towards their new vectors (after an update of ``emb[rows]``;
        ``rows`` sorted and unique). Only updated rows move: a row no step touches has not changed, and
        keeps its average. A full softmax touches every row, a contiguous block: that is updated in place
        (a gather and a scatter of the whole table cost ~15 % of the learner's throughput, measured)."""
        if not self.avg.shape[0] or not len(rows):
            return
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo == len(rows):
            self.avg[lo:hi].lerp_(self.emb[lo:hi], 1.0 - decay)
        else:
            self.avg[rows] = torch.lerp(self.avg[rows], self.emb[rows], 1.0 - decay)

    def serving_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``[u, F*d]`` per-facet unit rows that answers use for ``rows``: the normalised moving average
        when there is one (an average of unit vectors is shorter than 1), else the trained rows. Only the
        asked rows are normalised: a query reads its window's items, not the catalogue."""
        return self.normalise(self.avg[rows]) if self.avg.shape[0] else self.emb[rows]

    def serving_vectors(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`vectors` of the :meth:`serving_rows` (all rows if ``rows`` is None)."""
        idx = torch.arange(len(self)) if rows is None else torch.as_tensor(rows)
        return self.serving_rows(idx).view(-1, self.facets, self.dim)

    def normalise(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-facet L2 normalisation of ``[n, F*d]`` rows."""
        v = flat.view(-1, self.facets, self.dim)
        return (v / v.norm(dim=2, keepdim=True).clamp(min=1e-12)).view(-1, self.facets * self.dim)

    def vectors(self, rows: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Normalised vectors ``[n, F, d]`` (all rows if ``rows`` is None)."""
        data = self.emb[: len(self)] if rows is None else self.emb[torch.as_tensor(rows)]
        return data.view(-1, self.facets, self.dim)

    def live_rows(self) -> np.ndarray:
        """int64 rows of every live item."""
        return np.flatnonzero(self.live[: len(self)])

    def sample_tag_mates(self, rows: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """For each row with tags, one random live other row sharing one of its tags.

        Returns ``(which, mates)``: indices into ``rows`` that got a mate, and the mates' rows.
        """
        which, mates = [], []
        for i, r in enumerate(rows.tolist()):
            tags = self.tags[r]
            if not tags:
                continue
            members = self.tag_rows[tags[int(rng.integers(len(tags)))]]
            if len(members) < 2:
                continue
            mate = members[int(rng.integers(len(members)))]
            if mate != r and self.live[mate]:
                which.append(i)
                mates.append(mate)
        return np.asarray(which, dtype=np.int64), np.asarray(mates, dtype=np.int64)

    def state(self) -> dict:
        n = len(self)
        return {"ids": self.ids.state(), "emb": self.emb[:n].clone(), "acc": self.acc[:n].clone(),
                "codes": self.codes[:n].clone(), "live": self.live[:n].copy(),
                "tags": [list(t) for t in self.tags], "tag_names": self.tag_names.state(),
                "tag_rows": [list(t) for t in self.tag_rows],
                "ctx": self.ctx[:n].clone(), "ctx_acc": self.ctx_acc[:n].clone(), "avg": self.avg[:n].clone()}

    def load_state(self, state: dict) -> None:
        self.ids = IdMap.from_state(state["ids"])
        n = len(self.ids)
        self._grow(n)
        self.emb[:n], self.acc[:n], self.codes[:n] = state["emb"], state["acc"], state["codes"]
        self.live[:n] = state["live"]
        self.tags = [list(t) for t in state["tags"]]
        self.tag_names = IdMap.from_state(state["tag_names"])
        self.tag_rows = [list(t) for t in state["tag_rows"]]
        if self.ctx.shape[0] and "ctx" in state:
            self.ctx[:n], self.ctx_acc[:n] = state["ctx"], state["ctx_acc"]
        if self.avg.shape[0]:  # a checkpoint without an average (older, or taken with it off) starts it here
            avg = state.get("avg")
            self.avg[:n] = avg if avg is not None and len(avg) == n else self.emb[:n]
