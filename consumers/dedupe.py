"""Remember the most recent ``event_id`` values and drop repeats (docs/design.md §Wire formats).

A set for O(1) membership plus a FIFO of insertion order for O(1) eviction: a plain dict popped from
the front degrades (CPython leaves dummies that every ``next(iter(d))`` must skip), and an
``OrderedDict`` costs about twice the memory. With the default window of one million ids this stays
around 100 MB in the worst case of long ids; the window size is ``settings.ingest.dedupe_window``.
"""

from __future__ import annotations

from collections import deque


class DedupeWindow:
    """``seen(event_id)`` is True when the id is among the last ``capacity`` distinct ids admitted.

    >>> w = DedupeWindow(2)
    >>> [w.seen(x) for x in ["a", "b", "a", "c", "a"]]
    [False, False, True, False, False]

    The last ``a`` is new again: admitting ``c`` evicted the oldest id, ``a``. A capacity of 0
    disables de-duplication.
    """

    __slots__ = ("capacity", "_ids", "_order")

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, not {capacity}")
        self.capacity = capacity
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def seen(self, event_id: str) -> bool:
        """Check and admit in one step: True for a duplicate (not re-admitted), False for a new id."""
        if self.capacity == 0:
            return False
        if event_id in self._ids:
            return True
        self._ids.add(event_id)
        self._order.append(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())
        return False

    def recent(self, n: int) -> list[str]:
        """The newest ``n`` admitted ids, oldest first: what a checkpoint stores to survive a restart."""
        if n <= 0:
            return []
        return list(self._order)[-n:]

    def admit_many(self, event_ids: list[str]) -> None:
        """Re-admit ids restored from a checkpoint, in their original order."""
        for event_id in event_ids:
            self.seen(event_id)
