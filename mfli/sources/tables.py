"""Event-log file formats reduced to ``(line, cells, error)`` rows, so one parser judges every format,
and the report of what reading skipped (:class:`EventLogReport`, :class:`BadRow`).

CSV/TSV (any delimiter, header row), JSON lines (or one JSON array of objects) and Parquet; text files may
be gzip-compressed (recognised by content). Line numbers are 1-based and count the CSV header, because
that is what an editor shows; for Parquet and JSON arrays they count records.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

Format = Literal["csv", "tsv", "jsonl", "parquet"]
Row = tuple[int, tuple | None, str]  # (line, the wanted cells or None if the row is unusable, why)
EXTENSIONS: dict[str, Format] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl",
                                 ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
_MALFORMED = object()


@dataclass(frozen=True)
class BadRow:
    line: int  # 1-based; CSV counts the header, Parquet and JSON arrays count records
    reason: str  # short and stable, e.g. "missing user", "unparsable time"
    raw: str = ""  # the offending cell (truncated), for the log


@dataclass
class EventLogReport:
    """What reading skipped: the caller can show it, test it, or decide the file is unusable."""

    path: Path
    rows: int = 0
    kept: int = 0
    bad: list[BadRow] = field(default_factory=list)
    catalogue_bad: list[BadRow] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        return len(self.bad) / self.rows if self.rows else 0.0

    def summary(self, first: int = 5) -> str:
        reasons = ", ".join(f"{r}: {n}" for r, n in Counter(b.reason for b in self.bad).most_common())
        lines = ", ".join(f"{b.line} ({b.reason})" for b in self.bad[:first])
        return (f"{self.path}: skipped {len(self.bad)} of {self.rows} rows ({reasons}); "
                f"first: line {lines}{', ...' if len(self.bad) > first else ''}")


class EventLogError(ValueError):
    """The file cannot be used as given; ``report`` is set when rows were read."""

    def __init__(self, message: str, report: EventLogReport | None = None) -> None:
        super().__init__(message)
        self.report = report


def detect_format(path: Path) -> Format:
    """From the extension, skipping a trailing ``.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".gz"]:
        suffixes.pop()
    if suffixes and suffixes[-1] in EXTENSIONS:
        return EXTENSIONS[suffixes[-1]]
    raise EventLogError(f"cannot tell the format of {path} from its extension ({', '.join(EXTENSIONS)}, "
                        "optionally .gz): pass fmt/--format csv|tsv|jsonl|parquet")


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"  # by content, so a compressed file needs no .gz name
    # utf-8-sig: spreadsheet exports start with a BOM that would otherwise stick to the first column name
    return (gzip.open if gz else open)(path, "rt", encoding="utf-8-sig", newline="")


class _Csv:
    def __init__(self, path: Path, fh: io.TextIOBase, delimiter: str | None) -> None:
        self.path = path
        first = fh.readline()
        if delimiter is None:  # the header's most frequent candidate: ids and times rarely contain them
            delimiter = max(",\t;|", key=first.count) if any(d in first for d in ",\t;|") else ","
        self._reader = csv.reader(itertools.chain([first], fh), delimiter=delimiter)
        self.columns = [c.strip() for c in next(self._reader, [])]
        self.seen, self.complete = set(self.columns), True

    def rows(self, wanted: Sequence[str]) -> Iterator[Row]:
        index, n, last = [self.columns.index(c) for c in wanted], len(self.columns), self._reader.line_num
        try:
            for row in self._reader:
                line, last = last + 1, self._reader.line_num
                if not row:
                    continue
                if len(row) > n:  # an unquoted delimiter inside a cell: the mapped cells may have moved
                    yield line, None, f"{len(row)} fields, header has {n}"
                    continue
                yield line, tuple(row[i] if i < len(row) else None for i in index), ""
        except csv.Error as exc:
            raise EventLogError(f"{self.path}: line {last + 1}: {exc}") from exc


class _Json:
    """JSON lines (or a single JSON array of objects); the columns are the keys seen."""

    complete = False  # a key may first appear on any line: columns are checked after reading

    def __init__(self, path: Path, fh: io.TextIOBase) -> None:
        objects = self._parse(path, fh)
        head = []  # up to the first object, whose keys decide the optional columns (ColumnMap.resolve)
        for record in objects:
            head.append(record)
            if isinstance(record[1], dict):
                break
        self.columns = list(head[-1][1]) if head and isinstance(head[-1][1], dict) else []
        self.seen: set[str] = set()
        self._objects = itertools.chain(head, objects)

    @staticmethod
    def _parse(path: Path, fh: io.TextIOBase) -> Iterator[tuple[int, Any]]:
        text = fh.read(4096)
        if text.lstrip().startswith("["):
            try:
                yield from enumerate(orjson.loads(text + fh.read()), 1)
            except orjson.JSONDecodeError as exc:
                raise EventLogError(f"{path}: not a valid JSON array: {exc}") from exc
            return
        for line, raw in enumerate(itertools.chain(io.StringIO(text + fh.readline()), fh), 1):
            if raw.strip():
                try:
                    yield line, orjson.loads(raw)
                except orjson.JSONDecodeError:
                    yield line, _MALFORMED

    def rows(self, wanted: Sequence[str]) -> Iterator[Row]:
        for line, obj in self._objects:
            if isinstance(obj, dict):
                self.seen.update(obj)
                yield line, tuple(obj.get(c) for c in wanted), ""
            else:
                yield line, None, "malformed JSON" if obj is _MALFORMED else "not a JSON object"


class _Parquet:
    def __init__(self, path: Path) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install 'mfli[eventlog]'") from None
        self._pa, self._file = pa, pq.ParquetFile(path)
        self.columns = list(self._file.schema_arrow.names)
        self.seen, self.complete = set(self.columns), True

    def rows(self, wanted: Sequence[str]) -> Iterator[Row]:
        line = 0
        for batch in self._file.iter_batches(batch_size=65_536, columns=list(dict.fromkeys(wanted))):
            for cells in zip(*(self._python(batch.column(c)) for c in wanted), strict=True):
                line += 1
                yield line, cells, ""


    def _python(self, column: Any) -> list:
        if self._pa.types.is_timestamp(column.type) and column.type.unit in ("us", "ns"):
            # datetime has no nanoseconds (to_pylist refuses them); the wire format has only ms anyway
            column = column.cast(self._pa.timestamp("ms", tz=column.type.tz), safe=False)
        return column.to_pylist()


Table = _Csv | _Json | _Parquet


def open_table(path: Path, fmt: Format | None, delimiter: str | None, stack: ExitStack) -> Table:
    """The file's rows; a text file's handle is closed by ``stack``."""
    fmt = fmt or detect_format(path)
    if fmt == "parquet":
        return _Parquet(path)
    fh = stack.enter_context(_open_text(path))
    if fmt == "jsonl":
        return _Json(path, fh)
    return _Csv(path, fh, delimiter or ("\t" if fmt == "tsv" else None))


def check_columns(path: Path, wanted: Sequence[str], table: Table) -> None:
    """A mapped column the file does not have is a mapping mistake: name the columns it does have."""
    missing = [c for c in wanted if c not in table.seen]
    if missing:
        have = ", ".join(sorted(table.seen, key=str)) or "none"
        raise EventLogError(f"{path}: no column {', '.join(map(repr, missing))}; the file has: {have} "
                            "(map fields with --columns user=...,item=...,time=...)")
