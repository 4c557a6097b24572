"""The users store keeps the last H events per user, in time order, and replays are no-ops."""

import subprocess
import sys

import orjson

from mfli.events import InteractionEvent
from mfli.storage.users_lmdb import UsersStore


def ev(i: int, user: str = "u1", ts: int | None = None) -> InteractionEvent:
    return InteractionEvent(event_id=f"e{i}", user_id=user, item_id=f"i{i}", event_type="view",
                            ts=ts if ts is not None else 1000 + i)


def test_window_keeps_newest_h_in_time_order(tmp_path):
    store = UsersStore(tmp_path / "users", history=3)
    store.apply([ev(1), ev(3), ev(2)])
    store.apply([ev(4)])
    items, ts, applied = store.history("u1")
    assert items == ["i2", "i3", "i4"]
    assert ts == sorted(ts)
    assert applied == 4


def test_keeps_older_seen_items_without_their_event_ids(tmp_path):
    """Beyond the H-event window the store keeps up to ``keep`` older items (what answers leave out),
    without event ids: replays of the window still change nothing, and a late event older than the
    full window is still dropped."""
    store = UsersStore(tmp_path / "users", history=3, keep=5)
    store.apply([ev(i) for i in range(4)])
    store.apply([ev(i) for i in range(4, 7)])
    items, ts, applied = store.history("u1")
    assert items == ["i2", "i3", "i4", "i5", "i6"] and ts == sorted(ts) and applied == 7
    assert store.event_ids("u1") == ["e4", "e5", "e6"]
    raw = store.records(["u1"])["u1"]
    assert store.apply([ev(5), ev(6), ev(1)]) == 0  # a replay and an event older than the window
    assert store.records(["u1"])["u1"] == raw
    store.apply([ev(7)])
    assert store.history("u1")[0] == ["i3", "i4", "i5", "i6", "i7"]
    assert UsersStore(tmp_path / "other", history=3, keep=0).keep == 3


def test_replaying_a_window_changes_nothing(tmp_path):
    store = UsersStore(tmp_path / "users", history=3)
    batch = [ev(i) for i in range(5)] + [ev(i, user="u2") for i in range(2)]
    assert store.apply(batch, offsets={"events:0": 7}) == 7
    before = (store.history("u1"), store.history("u2"))
    assert store.apply(batch, offsets={"events:0": 7}) == 0
    assert (store.history("u1"), store.history("u2")) == before
    assert store.offsets() == {"events:0": 7}


def test_readonly_reader_in_another_process_sees_writes(tmp_path):
    writer = UsersStore(tmp_path / "users", history=5)
    writer.apply([ev(1)])
    writer.apply([ev(2)])
    code = (
        "import sys, orjson; from mfli.storage.users_lmdb import UsersStore;"
        "r = UsersStore(sys.argv[1], history=5, readonly=True);"
        "print(orjson.dumps([r.history('u1')[0], r.history('nobody')[0], r.version(), r.user_ids(10)]).decode())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "users")], capture_output=True, text=True,
                         check=True).stdout
    assert orjson.loads(out) == [["i1", "i2"], [], 2, ["u1"]]
