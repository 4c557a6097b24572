"""Generic event logs: every format parses to the exact columns, bad rows are reported by line and reason,
wrong mappings fail with the columns that exist, and `load_interactions` still sends directories to the
MovieLens reader. The last tests go through `mfli produce --events`, the last one to a real broker."""

from __future__ import annotations

import gzip
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from mfli.orchestration.cli import parse_args
from mfli.sources import load_interactions, parse_columns, spec_from_args
from mfli.sources.eventlog import BadRow, ColumnMap, EventLogError, EventLogSpec, read_event_log

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def _bad(report) -> list[tuple[int, str]]:
    return [(b.line, b.reason) for b in report.bad]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


MAPPED = ColumnMap(user="uid", item="iid", time="timestamp", value="rating", event_type="type")
DIRTY_CSV = """uid,iid,timestamp,rating,type
u1,i1,1700000300,4,view
u2,i2,1700000100000,3.5,click
u3,i3,2023-11-14T22:15:00Z,5,like
,i4,1700000000,4,view
u5,i5
u6,i6,yesterday,4,view
u7,i7,1700000000,nan,view
u8,i8,1700000000,4,view,extra
u9,i9,1700000000,abc,view
 u10 , i10 ,2023-11-14 22:13:20+01:00,2,view
u11,i11,1700000200.5,1,view
u12,i12,1700000000,4,
u13,i13,-5,4,view
"""
DIRTY_BAD = [(5, "empty user"), (6, "missing time"), (7, "unparsable time"), (8, "non-finite value"),
             (9, "6 fields, header has 5"), (10, "unparsable value"), (13, "empty event_type"),
             (14, "time out of range")]


def test_csv_columns_sort_and_bad_rows(tmp_path, caplog):
    path = _write(tmp_path / "clicks.csv", DIRTY_CSV)
    with caplog.at_level(logging.WARNING, logger="mfli.sources.eventlog"):
        data, report = read_event_log(EventLogSpec(path=path, columns=MAPPED, max_bad_fraction=0.7))
    # seconds, milliseconds, ISO with Z / offset, fractional seconds; ties (lines 3 and 4) keep file order
    assert data.name == "clicks"
    assert data.users.tolist() == ["u10", "u2", "u3", "u11", "u1"]
    assert data.items.tolist() == ["i10", "i2", "i3", "i11", "i1"]
    assert data.ts.tolist() == [(T0 - 3600) * 1000, (T0 + 100) * 1000, (T0 + 100) * 1000,
                                (T0 + 200) * 1000 + 500, (T0 + 300) * 1000]
    assert data.values.dtype == np.float32 and data.values.tolist() == [2.0, 3.5, 5.0, 1.0, 4.0]
    assert data.ts.dtype == np.int64 and data.users.dtype == object
    assert data.event_types.tolist() == ["view", "click", "like", "view", "view"]
    assert _bad(report) == DIRTY_BAD
    assert report.rows == 13 and report.kept == 5
    assert report.bad[2] == BadRow(7, "unparsable time", "yesterday")
    assert "skipped 8 of 13 rows" in caplog.text
    assert "first: line 5 (empty user), 6 (missing time), 7 (unparsable time)" in caplog.text
    events = list(data.iter_events())
    assert [e.event_type for e in events] == data.event_types.tolist()
    assert events[0].event_id == "clicks-0" and events[0].ts == (T0 - 3600) * 1000


def test_too_many_bad_rows_is_an_error_with_the_report(tmp_path):
    path = _write(tmp_path / "clicks.csv", DIRTY_CSV)
    message = r"skipped 8 of 13 rows.*61\.5% of rows are bad, more than 10%"
    with pytest.raises(ValueError, match=message) as err:
        read_event_log(EventLogSpec(path=path, columns=MAPPED))
    assert isinstance(err.value, EventLogError) and _bad(err.value.report) == DIRTY_BAD


def test_sniffed_delimiter_bom_and_multiline_cells_keep_line_numbers(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text('user_id;item_id;ts;note\na;x;1000;"two\nlines"\nb;y;;plain\nc;z;500;plain\n',
                    encoding="utf-8-sig")
    data, report = read_event_log(EventLogSpec(path=path, max_bad_fraction=0.5))
    assert data.users.tolist() == ["c", "a"] and data.ts.tolist() == [500_000, 1_000_000]
    assert data.values.tolist() == [5.0, 5.0] and data.event_types is None  # implicit log: default value
    assert _bad(report) == [(4, "missing time")]


def test_gzip_by_extension_and_by_content(tmp_path):
    tsv = tmp_path / "log.tsv.gz"
    with gzip.open(tsv, "wt") as fh:
        fh.write("user_id\titem_id\tts\tvalue\nu\ti,j\t1700000000000\t2\n")
    hidden = tmp_path / "log.csv"  # compressed without saying so
    with gzip.open(hidden, "wt") as fh:
        fh.write("user_id,item_id,ts\nu,i,1700000000\n")
    a, _ = read_event_log(EventLogSpec(path=tsv))
    b, _ = read_event_log(EventLogSpec(path=hidden))
    assert (a.items.tolist(), a.ts.tolist(), a.values.tolist()) == (["i,j"], [T0 * 1000], [2.0])
    assert (b.items.tolist(), b.ts.tolist()) == (["i"], [T0 * 1000])


def test_jsonl_types_blank_lines_and_bad_records(tmp_path):
    lines = [
        {"user_id": 1, "item_id": "a", "ts": T0, "value": 4, "event_type": "view"},
        "",
        {"user_id": "2", "item_id": "b", "ts": "2023-11-14T22:13:20.250Z", "value": 3, "event_type": "click"},
        {"user_id": "3", "item_id": "c", "value": 5, "event_type": "view"},
        {"user_id": "4", "item_id": "d", "ts": T0, "value": None, "event_type": "view"},
        '{"user_id": "5", "item_id": "e", "ts": 1700000000',
        "[1, 2]",
        {"user_id": "6", "item_id": "f", "ts": T0, "value": 1e39, "event_type": "view"},
        {"user_id": "7", "item_id": "g", "ts": T0 * 1000 - 1000, "value": 2, "event_type": "view"},
    ]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path = _write(tmp_path / "ev.ndjson", text)
    data, report = read_event_log(EventLogSpec(path=path, max_bad_fraction=0.7))
    assert data.users.tolist() == ["7", "1", "2"]
    assert data.ts.tolist() == [T0 * 1000 - 1000, T0 * 1000, T0 * 1000 + 250]
    assert data.values.tolist() == [2.0, 4.0, 3.0] and data.event_types.tolist() == ["view", "view", "click"]
    assert _bad(report) == [(4, "missing time"), (5, "missing value"), (6, "malformed JSON"),
                            (7, "not a JSON object"), (8, "non-finite value")]
    assert report.rows == 8


def test_json_array_counts_records(tmp_path):
    path = _write(tmp_path / "ev.json", json.dumps([{"u": "a", "i": "x", "t": 1}, {"u": "", "i": "y", "t": 2},
                                                    {"u": "b", "i": "z", "t": 3}]))
    spec = EventLogSpec(path=path, columns=parse_columns("user=u,item=i,time=t"), time_unit="ms",
                        max_bad_fraction=0.5)
    data, report = read_event_log(spec)
    assert data.users.tolist() == ["a", "b"] and data.ts.tolist() == [1, 3]
    assert _bad(report) == [(2, "empty user")]


def test_parquet_native_types(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pc = pytest.importorskip("pyarrow.compute")
    t0 = datetime.fromtimestamp(T0, UTC)
    stamp = pa.array([t0, t0.replace(second=19), None, t0, t0.replace(second=18)], pa.timestamp("ns", tz="UTC"))
    stamp = pc.add(stamp, pa.scalar(1_234_567, pa.duration("ns")))  # sub-ms: datetime cannot hold ns
    table = pa.table({"user": pa.array([1, 2, 3, 4, 5], pa.int64()), "item": ["a", "b", "c", None, "e"],
                      "when": stamp, "score": pa.array([1.0, None, 2.0, 3.0, 4.0])})
    path = tmp_path / "ev.parquet"
    pq.write_table(table, path)
    spec = EventLogSpec(path=path, columns=parse_columns("user=user,item=item,time=when,value=score"),
                        max_bad_fraction=0.7)
    data, report = read_event_log(spec)
    assert data.users.tolist() == ["5", "1"] and data.items.tolist() == ["e", "a"]
    assert data.ts.tolist() == [(T0 - 2) * 1000 + 1, T0 * 1000 + 1] and data.values.tolist() == [4.0, 1.0]
    assert _bad(report) == [(2, "missing value"), (3, "missing time"), (4, "missing item")]
    with pytest.raises(ValueError, match=r"no column 'nope'; the file has: item, score, user, when"):
        read_event_log(spec.model_copy(update={"columns": parse_columns("user=user,item=item,time=nope")}))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install 'mfli\[eventlog\]'"):
        read_event_log(EventLogSpec(path=_write(tmp_path / "ev.parquet", "")))


@pytest.mark.parametrize("unit, cells, ts, bad", [
    ("s", ["1700000000000", "1700000000"], [T0 * 1000], [(2, "time out of range")]),
    ("ms", ["1700000000", "x"], [T0], [(3, "unparsable time")]),
    ("iso", ["2023-11-14T22:13:20", "1700000000"], [T0 * 1000], [(3, "unparsable time")]),
    ("auto", ["99999999999", "100000000000"], [100_000_000_000, 99_999_999_999_000], []),
])
def test_time_units(tmp_path, unit, cells, ts, bad):
    path = _write(tmp_path / "ev.csv", "user_id,item_id,ts\n" + "".join(f"u,i,{c}\n" for c in cells))
    data, report = read_event_log(EventLogSpec(path=path, time_unit=unit, max_bad_fraction=0.5))
    assert data.ts.tolist() == ts and _bad(report) == bad


def test_mapping_errors_list_the_columns_that_exist(tmp_path):
    csv_path = _write(tmp_path / "ev.csv", "a,b,ts\n1,2,3\n")
    with pytest.raises(ValueError, match=r"no column 'user_id', 'item_id'; the file has: a, b, ts"):
        read_event_log(EventLogSpec(path=csv_path))
    with pytest.raises(ValueError, match=r"no column 'rating'; the file has: a, b, ts"):
        read_event_log(EventLogSpec(path=csv_path,
                                    columns=parse_columns("user=a,item=b,time=ts,value=rating")))
    jsonl = _write(tmp_path / "ev.jsonl", '{"a": 1, "ts": 5}\n{"a": 2, "ts": 6, "b": 1}\n')
    with pytest.raises(ValueError, match=r"no column 'user_id', 'item_id'; the file has: a, b, ts"):
        read_event_log(EventLogSpec(path=jsonl))
    with pytest.raises(ValueError, match=r"no events"):
        read_event_log(EventLogSpec(path=_write(tmp_path / "empty.csv", "user_id,item_id,ts\n")))
    with pytest.raises(ValueError, match=r"cannot tell the format of .*data\.txt.*--format"):
        read_event_log(EventLogSpec(path=_write(tmp_path / "data.txt", "user_id,item_id,ts\nu,i,1\n")))
    assert len(read_event_log(EventLogSpec(path=tmp_path / "data.txt", fmt="csv"))[0]) == 1


def test_value_auto_detection_can_be_switched_off(tmp_path):
    path = _write(tmp_path / "ev.csv", "user_id,item_id,ts,value,event_type\nu,i,1,2,view\n")
    auto, _ = read_event_log(EventLogSpec(path=path))
    off, _ = read_event_log(EventLogSpec(path=path, columns=parse_columns("value=,event_type="),
                                         default_value=1.0))
    assert (auto.values.tolist(), auto.event_types.tolist()) == ([2.0], ["view"])
    assert (off.values.tolist(), off.event_types) == ([1.0], None)


def test_catalogue_tags_titles_and_bad_rows(tmp_path):
    events = _write(tmp_path / "ev.csv", "user_id,item_id,ts\nu,i1,1700000000\nu,i2,1700000001\n")
    items = _write(tmp_path / "items.csv", "movie,genres,title\ni1,Action|Comedy,One\ni2,,Two\n,Drama,None\n"
                                           "i9, Drama | ,Nine\n")
    spec = EventLogSpec(path=events, catalogue=items, catalogue_item_column="movie", tags_column="genres",
                        title_column="title")
    data, report = read_event_log(spec)
    assert data.item_tags == {"i1": ["Action", "Comedy"], "i2": [], "i9": ["Drama"]}
    assert data.item_titles == {"i1": "One", "i2": "Two", "i9": "Nine"}
    assert report.catalogue_bad == [BadRow(4, "empty item")]
    created = {e.item_id: e.created_ts for e in data.item_events()}
    assert created == {"i1": T0 * 1000, "i2": (T0 + 1) * 1000, "i9": 0}

    listed = _write(tmp_path / "items.jsonl", '{"item_id": "i1", "tags": ["x", " y "]}\n')
    other = spec.model_copy(update={"catalogue": listed, "catalogue_item_column": None, "tags_column": "tags",
                                    "title_column": None})
    assert read_event_log(other)[0].item_tags == {"i1": ["x", "y"]}
    with pytest.raises(ValueError, match=r"items\.csv: no column 'tags'; the file has: genres, movie, title"):
        read_event_log(spec.model_copy(update={"tags_column": "tags"}))


def _movielens_dir(root: Path) -> Path:
    root.mkdir()
    _write(root / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,100\n2,20,3.0,50\n")
    _write(root / "movies.csv", "movieId,title,genres\n10,Ten,Action|Drama\n20,Twenty,(no genres listed)\n")
    return root


def test_load_interactions_dispatches_directories_to_movielens(tmp_path, caplog):
    root = _movielens_dir(tmp_path / "ml")
    data = load_interactions(root)
    assert data.name == "ml-latest-small" and data.users.tolist() == ["2", "1"]
    assert data.ts.tolist() == [50_000, 100_000] and data.item_tags == {"10": ["Action", "Drama"], "20": []}
    with caplog.at_level(logging.WARNING, logger="mfli.sources"):
        assert load_interactions(EventLogSpec(path=root, time_unit="s")).name == "ml-latest-small"
    assert "event-log options (time_unit) do not apply" in caplog.text

    wire = _write(tmp_path / "wire.jsonl", json.dumps({"event_id": "x", "user_id": "u", "item_id": "i",
                                                       "event_type": "like", "value": 1.5, "ts": T0 * 1000}))
    data = load_interactions(str(wire))
    assert (data.name, data.values.tolist(), data.event_types.tolist()) == ("wire", [1.5], ["like"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_interactions(tmp_path / "missing.csv")


def test_parse_columns():
    assert parse_columns("user=uid, item=iid,time=t,value=rating,event_type=type") == MAPPED.model_copy(
        update={"time": "t"})
    assert parse_columns("time=when") == ColumnMap(time="when")
    for text, message in [("user", "not FIELD=COLUMN"), ("who=x", "not FIELD=COLUMN"),
                          ("user=a,user=b", "twice"), ("time=", "needs a column")]:
        with pytest.raises(ValueError, match=message):
            parse_columns(text)


def test_produce_parses_event_log_flags(tmp_path):
    argv = ["produce", "--events", "ev.csv.gz", "--columns", "user=uid,item=iid,time=timestamp,value=",
            "--time-unit", "s", "--delimiter", r"\t", "--catalogue", "items.csv", "--tags-column", "genres",
            "--tags-sep", ";", "--max-bad-fraction", "0.2", "--limit", "3"]
    args = parse_args(argv)
    assert spec_from_args(args) == EventLogSpec(
        path=Path("ev.csv.gz"), columns=ColumnMap(user="uid", item="iid", time="timestamp", value=None),
        time_unit="s", delimiter="\t", catalogue=Path("items.csv"), tags_column="genres", tags_sep=";",
        max_bad_fraction=0.2)
    assert spec_from_args(parse_args(["produce", "--synthetic", "10"])) is None
    for bad in (["--events", "a.csv", "--movielens", "ml"], ["--events", "a.csv", "--columns", "user"]):
        with pytest.raises(SystemExit):
            parse_args(["produce", *bad])
    with pytest.raises(ValueError, match=r"--columns only apply to an event log: pass --events FILE"):
        spec_from_args(parse_args(["produce", "--movielens", "ml", "--columns", "time=t"]))


def test_produce_events_stops_on_a_bad_file_before_touching_the_broker(tmp_path, caplog):
    from mfli.config import load_settings
    from mfli.orchestration import produce

    path = _write(tmp_path / "ev.csv", "uid,iid,t\nu,i,1\n")
    args = parse_args(["produce", "--events", str(path), "--bootstrap", "127.0.0.1:9"])
    with caplog.at_level(logging.ERROR):
        assert produce.run(args, load_settings()) == 2
    assert "no column 'user_id', 'item_id', 'ts'; the file has: iid, t, uid" in caplog.text


def test_produce_events_replays_a_csv_through_the_broker(kafka_settings, tmp_path):
    from mfli.consumers import EventStream
    from mfli.orchestration import produce

    events = _write(tmp_path / "shop.csv", "who;what;when;kind\nb;p2;2023-11-14T22:13:21Z;purchase\n"
                    "a;p1;1700000000;view\n;p3;1700000002;view\na;p2;1700000003;click\n")
    items = _write(tmp_path / "items.csv", "what,tags\np1,red|big\np2,blue\n")
    args = parse_args([
        "produce", "--events", str(events), "--columns", "user=who,item=what,time=when,event_type=kind",
        "--catalogue", str(items), "--max-bad-fraction", "0.5", "--no-progress"])
    assert produce.run(args, kafka_settings) == 0

    got, items_seen = [], []
    with EventStream(kafka_settings, group_id=kafka_settings.kafka.learner_group) as consumer:
        deadline = time.monotonic() + 30
        while len(got) + len(items_seen) < 5 and time.monotonic() < deadline:
            batch = consumer.poll_batch(timeout_ms=300)
            got += batch.events
            items_seen += batch.items
    assert sorted((e.event_id, e.user_id, e.item_id, e.event_type, e.value, e.ts) for e in got) == [
        ("shop-0", "a", "p1", "view", 5.0, T0 * 1000),
        ("shop-1", "b", "p2", "purchase", 5.0, (T0 + 1) * 1000),
        ("shop-2", "a", "p2", "click", 5.0, (T0 + 3) * 1000),
    ]
    assert sorted((i.item_id, tuple(i.tags), i.created_ts) for i in items_seen) == [
        ("p1", ("red", "big"), T0 * 1000), ("p2", ("blue",), (T0 + 1) * 1000)]
