"""External string ids -> dense rows, growing on first sight.

Rows are never reused (a deleted item keeps its row, marked not live), so item deltas, checkpoints and
the index can refer to rows without a generation counter.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class IdMap:
    """Append-only mapping between external ids and rows ``0..n-1``."""

    def __init__(self) -> None:
        self._row: dict[str, int] = {}
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def get(self, key: str) -> int | None:
        return self._row.get(key)

    def id_of(self, row: int) -> str:
        return self._ids[row]

    def ids(self) -> list[str]:
        return list(self._ids)

    def add(self, keys: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``keys`` (new ids get the next rows) and the int64 rows that were created."""
        row_of = self._row
        out: list[int] = []
        new: list[int] = []
        for key in keys:
            row = row_of.get(key)
            if row is None:
                row = len(self._ids)
                row_of[key] = row
                self._ids.append(key)
                new.append(row)
            out.append(row)
        return np.asarray(out, dtype=np.int64), np.asarray(new, dtype=np.int64)

    def state(self) -> list[str]:
        return list(self._ids)

    @classmethod
    def from_state(cls, ids: list[str]) -> IdMap:
        m = cls()
        m._ids = list(ids)
        m._row = {k: i for i, k in enumerate(m._ids)}
        return m
