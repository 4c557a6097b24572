"""Interaction sources, and the one way commands choose between them.

``load_interactions`` takes a MovieLens directory or an event-log file (docs/eventlog.md), so every
command that reads a dataset accepts the same things; ``add_source_arguments`` and ``spec_from_args`` give
those commands the same flags. The readers (pyarrow for Parquet, the event-log parser) are imported when
called: building a command's parser should not pay for them.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mfli.sources.eventlog import ColumnMap, EventLogSpec
    from mfli.sources.movielens import Interactions

log = logging.getLogger(__name__)

# flag -> (argparse dest, EventLogSpec field); every dest defaults to None = "the spec's default"
_FLAGS = {
    "--columns": ("columns", "columns"),
    "--time-unit": ("time_unit", "time_unit"),
    "--format": ("format", "fmt"),
    "--delimiter": ("delimiter", "delimiter"),
    "--default-value": ("default_value", "default_value"),
    "--max-bad-fraction": ("max_bad_fraction", "max_bad_fraction"),
    "--catalogue": ("catalogue", "catalogue"),
    "--catalogue-item-column": ("catalogue_item_column", "catalogue_item_column"),
    "--tags-column": ("tags_column", "tags_column"),
    "--tags-sep": ("tags_sep", "tags_sep"),
    "--title-column": ("title_column", "title_column"),
}


def load_interactions(source: str | Path | EventLogSpec) -> Interactions:
    """A directory is MovieLens (any of its layouts); a file is an event log, read with ``source``'s
    mapping if it is an ``EventLogSpec`` or else the default one (``user_id``, ``item_id``, ``ts``)."""
    from mfli.sources.eventlog import EventLogSpec, load_event_log
    from mfli.sources.movielens import load_movielens

    spec = source if isinstance(source, EventLogSpec) else None
    path = spec.path if spec is not None else Path(source)  # type: ignore[arg-type]
    if path.is_dir():
        if spec is not None and spec.model_fields_set - {"path"}:
            log.warning("%s is a MovieLens directory: the event-log options (%s) do not apply", path,
                        ", ".join(sorted(spec.model_fields_set - {"path"})))
        return load_movielens(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a MovieLens directory or an event-log "
                                "file)")
    return load_event_log(spec if spec is not None else EventLogSpec(path=path))


def parse_columns(text: str) -> ColumnMap:
    """``user=uid,item=iid,time=timestamp[,value=rating,event_type=type]``; ``value=`` maps nothing."""
    from mfli.sources.eventlog import ColumnMap

    fields: dict[str, str | None] = {}
    for part in filter(str.strip, text.split(",")):
        key, eq, column = (s.strip() for s in part.partition("="))
        if not eq or key not in ColumnMap.model_fields:
            raise ValueError(f"{part.strip()!r} is not FIELD=COLUMN with FIELD one of "
                             f"{', '.join(ColumnMap.model_fields)}")
        if key in fields:
            raise ValueError(f"{key} is mapped twice")
        if not column and key in ("user", "item", "time"):
            raise ValueError(f"{key} needs a column name")
        fields[key] = column or None
    return ColumnMap(**fields)


def _columns_arg(text: str) -> ColumnMap:
    try:
        return parse_columns(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _delimiter_arg(text: str) -> str:
    return "\t" if text in ("\\t", "tab") else text


def add_source_arguments(parser: argparse.ArgumentParser, *, group: argparse._ActionsContainer | None = None,
                         events: bool = True) -> None:
    """The event-log flags. ``--events FILE`` goes into ``group`` (e.g. a mutually exclusive source
    group) if given; ``events=False`` leaves it out, for a command that takes the path another way (then
    pass it as ``spec_from_args(args, path)``)."""
    if events:
        (group or parser).add_argument("--events", metavar="FILE", default=None,
                                       help="event log: .csv/.tsv/.jsonl/.json/.parquet, optionally .gz")
    g = parser.add_argument_group("event log (docs/eventlog.md)")
    g.add_argument("--columns", type=_columns_arg, default=None, metavar="MAP",
                   help="user=COL,item=COL,time=COL[,value=COL,event_type=COL] (default: user_id, "
                        "item_id, ts; value and event_type if the file has them)")
    g.add_argument("--time-unit", choices=["auto", "s", "ms", "iso"], default=None,
                   help="epoch seconds, milliseconds, ISO-8601, or auto (numbers by magnitude; default)")
    g.add_argument("--format", choices=["csv", "tsv", "jsonl", "parquet"], default=None,
                   help="default: from the extension")
    g.add_argument("--delimiter", type=_delimiter_arg, default=None,
                   help="CSV delimiter, '\\t' or tab for a tab (default: guessed from the header)")
    g.add_argument("--default-value", type=float, default=None, help="value when none is mapped (default 5)")
    g.add_argument("--max-bad-fraction", type=float, default=None,
                   help="fail if more than this share of rows is bad (default 0.1)")
    g.add_argument("--catalogue", metavar="FILE", default=None, help="items: CSV/JSONL with item id and tags")
    g.add_argument("--catalogue-item-column", default=None, help="its item id column (default: as --columns)")
    g.add_argument("--tags-column", default=None, help="its tags column (default: tags)")
    g.add_argument("--tags-sep", default=None, help="separator inside the tags cell (default: |)")
    g.add_argument("--title-column", default=None, help="its title column (default: none)")


def spec_from_args(args: argparse.Namespace, path: str | Path | None = None) -> EventLogSpec | None:
    """The ``EventLogSpec`` the flags describe for ``path`` (default ``args.events``); ``None`` without a
    path. Raises ``ValueError`` for event-log flags without a path, or an invalid combination."""
    from mfli.sources.eventlog import EventLogSpec

    path = path if path is not None else getattr(args, "events", None)
    given = {flag: (name, getattr(args, dest)) for flag, (dest, name) in _FLAGS.items()
             if getattr(args, dest, None) is not None}
    if path is None:
        if given:
            raise ValueError(f"{', '.join(given)} only apply to an event log: pass --events FILE")
        return None
    return EventLogSpec(path=Path(path), **dict(given.values()))
