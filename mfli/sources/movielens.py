"""Readers for the three MovieLens layouts, sorted into one time-ordered interaction log.

The files are read from where they lie (``../shared/data/...``) at run time: their licence forbids
copying them into the repository. A ``Interactions`` holds numpy columns rather than event objects
because the evaluation streams a million events and object creation would dominate its run time;
``iter_events`` turns rows into wire events for the producer.
"""

from __future__ import annotations

import csv
import gzip
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mfli.events import InteractionEvent, ItemEvent

log = logging.getLogger(__name__)

_ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]


@dataclass
class Interactions:
    """A time-sorted interaction log with string ids, plus the item catalogue (tags and titles)."""

    name: str
    users: np.ndarray  # object array of str user ids, one per event
    items: np.ndarray  # object array of str item ids
    values: np.ndarray  # float32 rating
    ts: np.ndarray  # int64 epoch milliseconds, non-decreasing
    item_tags: dict[str, list[str]] = field(default_factory=dict)
    item_titles: dict[str, str] = field(default_factory=dict)
    event_types: np.ndarray | None = None  # object array of str per event, when the source has them

    def __len__(self) -> int:
        return len(self.ts)

    def iter_events(self, event_type: str = "rating", prefix: str = "") -> Iterator[InteractionEvent]:
        """Wire events in time order; ``event_id`` is the row number (stable across replays).

        ``event_type`` is used when the log has no ``event_types`` column (MovieLens has only ratings)."""
        for i in range(len(self.ts)):
            yield InteractionEvent(
                event_id=f"{prefix}{self.name}-{i}",
                user_id=str(self.users[i]),
                item_id=str(self.items[i]),
                event_type=event_type if self.event_types is None else str(self.event_types[i]),
                value=float(self.values[i]),
                ts=int(self.ts[i]),
            )

    def item_events(self) -> Iterator[ItemEvent]:
        """The catalogue as upserts, created at the item's first interaction (or 0 if never rated)."""
        first: dict[str, int] = {}
        for item, t in zip(self.items.tolist(), self.ts.tolist(), strict=True):
            first.setdefault(item, t)
        for item, tags in self.item_tags.items():
            yield ItemEvent(item_id=item, op="upsert", created_ts=first.get(item, 0), tags=tags,
                            text=self.item_titles.get(item))


def _sorted(
    name: str, users: list, items: list, values: list, ts_seconds: list, tags: dict, titles: dict
) -> Interactions:
    ts = np.asarray(ts_seconds, dtype=np.int64) * 1000
    # Stable sort keeps the file's order among equal timestamps, so runs are reproducible.
    order = np.argsort(ts, kind="stable")
    return Interactions(
        name=name,
        users=np.asarray(users, dtype=object)[order],
        items=np.asarray(items, dtype=object)[order],
        values=np.asarray(values, dtype=np.float32)[order],
        ts=ts[order],
        item_tags=tags,
        item_titles=titles,
    )


def _read_ml1m(root: Path) -> Interactions:
    ratings = root / "ratings.dat.gz"
    opener = gzip.open if ratings.exists() else open
    if not ratings.exists():
        ratings = root / "ratings.dat"
    users, items, values, ts = [], [], [], []
    with opener(ratings, "rt", encoding="ascii") as fh:
        for line in fh:
            u, i, r, t = line.rstrip("\n").split("::")
            users.append(u)
            items.append(i)
            values.append(float(r))
            ts.append(int(t))
    tags: dict[str, list[str]] = {}
    titles: dict[str, str] = {}
    movies = root / "movies.dat"
    if movies.exists():
        with open(movies, encoding="iso-8859-1") as fh:
            for line in fh:
                mid, title, genres = line.rstrip("\n").split("::")
                tags[mid] = genres.split("|") if genres else []
                titles[mid] = title
    return _sorted("ml-1m", users, items, values, ts, tags, titles)


def _read_ml100k(root: Path) -> Interactions:
    users, items, values, ts = [], [], [], []
    with open(root / "u.data", encoding="ascii") as fh:
        for line in fh:
            u, i, r, t = line.split("\t")
            users.append(u)
            items.append(i)
            values.append(float(r))
            ts.append(int(t))
    tags: dict[str, list[str]] = {}
    titles: dict[str, str] = {}
    item_file = root / "u.item"
    if item_file.exists():
        with open(item_file, encoding="iso-8859-1") as fh:
            for line in fh:
                parts = line.rstrip("\n").split("|")
                flags = parts[5:24]
                tags[parts[0]] = [g for g, f in zip(_ML100K_GENRES, flags, strict=False) if f == "1"]
                titles[parts[0]] = parts[1]
    return _sorted("ml-100k", users, items, values, ts, tags, titles)


def _read_latest(root: Path) -> Interactions:
    users, items, values, ts = [], [], [], []
    with open(root / "ratings.csv", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for u, i, r, t in reader:
            users.append(u)
            items.append(i)
            values.append(float(r))
            ts.append(int(t))
    tags: dict[str, list[str]] = {}
    titles: dict[str, str] = {}
    movies = root / "movies.csv"
    if movies.exists():
        with open(movies, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh)
            next(reader)
            for mid, title, genres in reader:
                tags[mid] = [] if genres == "(no genres listed)" else genres.split("|")
                titles[mid] = title
    return _sorted("ml-latest-small", users, items, values, ts, tags, titles)


def load_movielens(path: str | Path) -> Interactions:
    """Read a MovieLens directory (ml-1m, ml-100k or ml-latest-small layout), sorted by time."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory with MovieLens files")
    if (root / "ratings.dat.gz").exists() or (root / "ratings.dat").exists():
        data = _read_ml1m(root)
    elif (root / "u.data").exists():
        data = _read_ml100k(root)
    elif (root / "ratings.csv").exists():
        data = _read_latest(root)
    else:
        raise FileNotFoundError(
            f"{root} has none of ratings.dat[.gz] (ml-1m), u.data (ml-100k) or ratings.csv (ml-latest-small)"
        )
    log.info("loaded %s: %d interactions, %d catalogue items", data.name, len(data), len(data.item_tags))
    return data
