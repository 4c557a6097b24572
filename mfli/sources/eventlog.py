"""Generic event logs (CSV/TSV, JSON lines, Parquet) read into the same ``Interactions`` as MovieLens.

Users evaluate on and replay their own logs, whose column names, time formats and dirt differ from file to
file. A column mapping names the fields; every file format is reduced to ``(line, raw cells)`` rows so one
parser decides what a good row is. A bad row (missing field, unparsable time, non-finite value, empty id)
is skipped and reported with its line number, because real logs have a few and one should not stop a
replay; but many bad rows mean a wrong mapping or time unit, so past ``max_bad_fraction`` it is an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mfli.sources.movielens import Interactions
from mfli.sources.tables import (
    BadRow,
    EventLogError,
    EventLogReport,
    Format,
    check_columns,
    detect_format,
    open_table,
)

__all__ = ["BadRow", "ColumnMap", "EventLogError", "EventLogReport", "EventLogSpec", "detect_format",
           "load_event_log", "read_event_log"]

log = logging.getLogger(__name__)

TimeUnit = Literal["auto", "s", "ms", "iso"]
MS_THRESHOLD = 1e11  # auto unit: |t| >= 1e11 is epoch ms (1973-03 in ms, year 5138 in seconds)
_MAX_TS = 10**14  # the wire schema's bound on ts (InteractionEvent)
_FLOAT32_MAX = 3.4028234663852886e38
_ID_MAX, _TYPE_MAX = 256, 32  # the wire schema's id and event_type lengths: longer would be dead-lettered
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ColumnMap(BaseModel):
    """Which column holds each field. ``value``/``event_type``, unless set (``None`` = not mapped), are
    taken from columns literally named ``value``/``event_type`` when the file has them, so a file in the
    wire format reads with no mapping at all."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    user: str = Field("user_id", min_length=1)
    item: str = Field("item_id", min_length=1)
    time: str = Field("ts", min_length=1)
    value: str | None = None
    event_type: str | None = None

    def resolve(self, available: Sequence[str]) -> dict[str, str]:
        """field -> column for the fields that are mapped in a file with ``available`` columns."""
        mapping = {k: v for k, v in self.model_dump().items() if v}
        for name in ("value", "event_type"):
            if name not in self.model_fields_set and name in available:
                mapping[name] = name
        return mapping


class EventLogSpec(BaseModel):
    """Everything needed to read one event log (and its optional item catalogue)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path
    fmt: Format | None = Field(None, description="default: from the extension (a trailing .gz is skipped)")
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="CSV; default: sniffed")
    columns: ColumnMap = ColumnMap()
    time_unit: TimeUnit = "auto"
    default_value: float = Field(5.0, description="value when none is mapped: an implicit log's events are "
                                 "engagements, so they count as positives (learner positive_threshold 4)")
    max_bad_fraction: float = Field(0.1, ge=0.0, le=1.0)
    catalogue: Path | None = None
    catalogue_item_column: str | None = Field(None, description="default: the events' item column")
    tags_column: str = "tags"
    tags_sep: str = Field("|", min_length=1)
    title_column: str | None = None
    name: str | None = Field(None, description="dataset name in event ids; default: the file's stem")


class _Skip(Exception):
    def __init__(self, reason: str, raw: Any = "") -> None:
        self.reason, self.raw = reason, str(raw)[:80]


def _text(raw: Any, name: str, limit: int) -> str:
    if raw is None:
        raise _Skip(f"missing {name}")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise _Skip(f"bad {name}", raw)
    text = str(raw).strip()
    if not text:
        raise _Skip(f"empty {name}")
    if len(text) > limit:
        raise _Skip(f"{name} longer than {limit}", text)
    return text


def _number(raw: str | float) -> int | float | None:
    if not isinstance(raw, str):
        return raw if math.isfinite(raw) else None
    try:
        return int(raw)
    except ValueError:
        try:
            num = float(raw)
        except ValueError:
            return None
        return num if math.isfinite(num) else None


def _in_range(ms: int, raw: Any) -> int:
    if not 0 <= ms < _MAX_TS:
        raise _Skip("time out of range", raw)
    return ms


def _ms(raw: Any, unit: TimeUnit) -> int:
    """Epoch ms from epoch s/ms numbers (by magnitude when ``auto``) or ISO-8601 (naive = UTC)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise _Skip("missing time")
    if isinstance(raw, date):  # Parquet timestamp/date columns, and parsed ISO strings
        dt = raw if isinstance(raw, datetime) else datetime(raw.year, raw.month, raw.day)
        dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)
        return _in_range((dt - _EPOCH) // timedelta(milliseconds=1), raw)
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise _Skip("unparsable time", raw)
    num = None if unit == "iso" else _number(raw)
    if num is None:
        if unit in ("s", "ms") or not isinstance(raw, str):
            raise _Skip("unparsable time", raw)
        try:
            return _ms(datetime.fromisoformat(raw.strip()), unit)
        except ValueError:
            raise _Skip("unparsable time", raw) from None
    if unit == "s" or (unit == "auto" and abs(num) < MS_THRESHOLD):
        num *= 1000
    return _in_range(round(num), raw)


def _value(raw: Any) -> float:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise _Skip("missing value")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise _Skip("unparsable value", raw) from None
    if not (math.isfinite(value) and abs(value) <= _FLOAT32_MAX):  # float32 would turn it into inf
        raise _Skip("non-finite value", raw)
    return value


def _catalogue(spec: EventLogSpec, report: EventLogReport) -> tuple[dict[str, list[str]], dict[str, str]]:
    """item -> tags (a list cell, or a text cell split on ``tags_sep``) and item -> title."""
    assert spec.catalogue is not None
    wanted = [spec.catalogue_item_column or spec.columns.item, spec.tags_column]
    wanted += [spec.title_column] if spec.title_column else []
    tags: dict[str, list[str]] = {}
    titles: dict[str, str] = {}
    with ExitStack() as stack:
        table = open_table(spec.catalogue, None, None, stack)
        if table.complete:
            check_columns(spec.catalogue, wanted, table)
        for line, cells, error in table.rows(wanted):
            try:
                if cells is None:
                    raise _Skip(error)
                item = _text(cells[0], "item", _ID_MAX)
            except _Skip as skip:
                report.catalogue_bad.append(BadRow(line, skip.reason, skip.raw))
                continue
            raw = cells[1]
            parts = raw if isinstance(raw, list) else [] if raw is None else str(raw).split(spec.tags_sep)
            tags[item] = [t for t in (str(p).strip() for p in parts) if t][:64]  # the wire schema's limit
            if spec.title_column and cells[2] is not None:
                titles[item] = str(cells[2])[:4096]
        if table.seen:  # nothing seen: every row was unusable, which the bad rows already say
            check_columns(spec.catalogue, wanted, table)
    if report.catalogue_bad:
        first = ", ".join(f"{b.line} ({b.reason})" for b in report.catalogue_bad[:5])
        log.warning("%s: skipped %d catalogue rows, first: line %s", spec.catalogue, len(report.catalogue_bad),
                    first)
    return tags, titles


def read_event_log(spec: EventLogSpec) -> tuple[Interactions, EventLogReport]:
    """The log as time-sorted ``Interactions`` (stable: ties keep file order) plus what was skipped.

    Raises ``EventLogError`` (a ``ValueError``) when a mapped column does not exist, when there are no
    good rows, or when more than ``spec.max_bad_fraction`` of the rows are bad."""
    report = EventLogReport(spec.path)
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    times: list[int] = []
    types: list[str] = []
    with ExitStack() as stack:
        table = open_table(spec.path, spec.fmt, spec.delimiter, stack)
        mapping = spec.columns.resolve(table.columns)
        has_value, has_type = "value" in mapping, "event_type" in mapping
        if table.complete:
            check_columns(spec.path, list(mapping.values()), table)
        for line, cells, error in table.rows(list(mapping.values())):
            report.rows += 1
            try:
                if cells is None:
                    raise _Skip(error)
                row = dict(zip(mapping, cells, strict=False))
                user, item = _text(row["user"], "user", _ID_MAX), _text(row["item"], "item", _ID_MAX)
                ms = _ms(row["time"], spec.time_unit)
                value = _value(row["value"]) if has_value else spec.default_value
                kind = _text(row["event_type"], "event_type", _TYPE_MAX) if has_type else ""
            except _Skip as skip:
                report.bad.append(BadRow(line, skip.reason, skip.raw))
                continue
            users.append(user)
            items.append(item)
            times.append(ms)
            values.append(value)
            types.append(kind)
        if table.seen:  # nothing seen: every row was unusable, which the bad-row error below says better
            check_columns(spec.path, list(mapping.values()), table)
    report.kept = len(times)
    if report.bad:
        log.warning("%s", report.summary())
    if report.bad_fraction > spec.max_bad_fraction:
        raise EventLogError(f"{report.summary()}: {report.bad_fraction:.1%} of rows are bad, more than "
                            f"{spec.max_bad_fraction:.0%}; check the column mapping and time unit", report)
    if not report.kept:
        raise EventLogError(f"{spec.path}: no events", report)
    tags, titles = _catalogue(spec, report) if spec.catalogue else ({}, {})
    ts = np.asarray(times, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    data = Interactions(
        name=(spec.name or spec.path.name.split(".")[0] or "events")[:64],
        users=np.asarray(users, dtype=object)[order], items=np.asarray(items, dtype=object)[order],
        values=np.asarray(values, dtype=np.float32)[order], ts=ts[order], item_tags=tags, item_titles=titles,
        event_types=np.asarray(types, dtype=object)[order] if has_type else None,
    )
    return data, report


def load_event_log(spec: EventLogSpec) -> Interactions:
    """``read_event_log`` without the report (it has been logged)."""
    data, report = read_event_log(spec)
    log.info("loaded %s: %d interactions (%d rows skipped), %d catalogue items", spec.path, len(data),
             len(report.bad), len(data.item_tags))
    return data
