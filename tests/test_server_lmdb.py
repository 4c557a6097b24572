"""A real ``mfli serve`` process over a real LMDB index and users store, on loopback.

* readiness, recommend/items answers carrying the index version;
* freshness: a new user's first event written to the users store changes their next answer;
* atomicity through HTTP: while the indexer swaps in full passes, every answer the server gives at an
  index version equals the answer computed directly on that committed version — a reader that saw a
  half-applied pass would produce an answer that matches no committed version.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest

from mfli.benchmarks.serve import write_lmdb
from mfli.benchmarks.workloads import synthetic_catalogue, synthetic_histories
from mfli.config import load_settings
from mfli.deltas import CodebookSnapshot
from mfli.events import InteractionEvent
from mfli.server.lmdb_state import LmdbState
from mfli.server.service import RecommendService
from mfli.storage.index.reader import LmdbIndex
from mfli.storage.index.writer import IndexWriter
from mfli.storage.users_lmdb import UsersStore

from test_server_harness import serve_process

N = 4000


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    settings = load_settings(index={"path": str(root / "index.lmdb"), "map_size": 1 << 30, "target_cluster_size": 16},
                             learner={"users_path": str(root / "users.lmdb")})
    snap = synthetic_catalogue(N, facets=3, dim=16, seed=5)
    histories = synthetic_histories(snap, users=10, history=30, seed=6)
    write_lmdb(snap, settings.index.path, settings.learner.users_path, histories, settings)
    return settings, snap


@pytest.fixture(scope="module")
def server(stores):
    settings, _ = stores
    with serve_process(settings.index.path, settings.learner.users_path, map_size=1 << 30) as client:
        yield client


def test_ready_recommend_and_item_over_lmdb(server, stores):
    settings, snap = stores
    ready = server.get("/readyz").json()
    assert ready["status"] == "ok" and ready["items"] == N and ready["codebook_version"] == snap.version
    body = server.get("/v1/recommend", params={"user_id": "u3", "k": 10}).json()
    assert body["fallback"] is False and len(body["items"]) == 10
    assert body["index_version"] == ready["index_version"]
    item = server.get("/v1/items/i17").json()
    assert item["codes"] == snap.codes[17].tolist() and item["updated_ts"] > 0 and len(item["clusters"]) == 3
    assert server.get("/v1/items/nope").status_code == 404
    assert server.get("/v1/recommend", params={"user_id": "u3", "k": "0"}).status_code == 400


def test_new_users_first_event_changes_their_answer(server, stores):
    settings, _ = stores
    before = server.get("/v1/recommend", params={"user_id": "fresh-user", "k": 10}).json()
    assert before["fallback"] is True
    users = UsersStore(settings.learner.users_path, history=settings.model.history)
    try:
        users.apply([InteractionEvent(event_id="fresh-1", user_id="fresh-user", item_id="i123", event_type="view",
                                      ts=10_000)])
    finally:
        users.close()
    after = server.get("/v1/recommend", params={"user_id": "fresh-user", "k": 10}).json()
    assert after["fallback"] is False
    assert {i["item_id"] for i in after["items"]} != {i["item_id"] for i in before["items"]}
    assert "i123" not in {i["item_id"] for i in after["items"]}


def test_gauges_are_exported_by_the_live_process(server):
    for user in ("u1", "u2", "u4"):
        server.get("/v1/recommend", params={"user_id": user})
    deadline = __import__("time").monotonic() + 15
    while __import__("time").monotonic() < deadline:
        text = server.get("/metrics").text
        if 'mfli_index_recall_ratio{k="20"}' in text:
            break
        __import__("time").sleep(0.2)
    line = next(ln for ln in text.splitlines() if ln.startswith('mfli_index_recall_ratio{k="20"}'))
    assert 0.3 <= float(line.split()[-1]) <= 1.0


@pytest.mark.slow
def test_readers_never_see_a_half_applied_full_pass(server, stores):
    """Hammer the server while full passes (different seeds -> different clusters) commit one after another.

    A torn read (records of one pass, posting lists of another) would pick clusters by the new numbering
    and gather the old members: its recommendation or the item's clusters would match no committed version.
    """
    settings, snap = stores
    users = ["u0", "u5", "u7"]
    probes = ["i17", "i2500"]
    expected: dict[tuple[int, str], list[str]] = {}
    seen: list[tuple[int, str, list[str]]] = []
    stop = threading.Event()
    errors: list[str] = []

    writer = IndexWriter(settings.index.path, settings.index)
    state = LmdbState(settings, index=LmdbIndex(settings.index.path, env=writer.env))
    service = RecommendService(settings)

    def expect_current() -> None:
        with state.read() as read:
            for user in users:
                out = service.recommend(read, user, [], [], 20, "index", True)
                expected[(read.index_version, user)] = [i["item_id"] for i in out["items"]]
            for item in probes:
                expected[(read.index_version, item)] = service.item(read, item)["clusters"]

    def hammer() -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=10) as client:
            i = 0
            while not stop.is_set():
                user = users[i % len(users)]
                resp = client.get("/v1/recommend", params={"user_id": user, "k": 20})
                if resp.status_code != 200:
                    errors.append(resp.text)
                body = resp.json()
                seen.append((body["index_version"], user, [it["item_id"] for it in body["items"]]))
                item = probes[i % len(probes)]
                body = client.get(f"/v1/items/{item}").json()
                seen.append((body["index_version"], item, body["clusters"]))
                i += 1

    expect_current()
    readers = [threading.Thread(target=hammer) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        rng = np.random.default_rng(0)
        for step in range(1, 5):
            # A new codebook (level-1 codewords permuted) re-encodes every item: new codes, new clusters.
            books = snap.codebooks.copy()
            books[:, 0] = books[:, 0, rng.permutation(books.shape[2])]
            writer.apply(None, None, [CodebookSnapshot(snap.version + step, books)])
            expect_current()
            writer.full_pass(seed=step)
            expect_current()  # the writer is idle until the next write: this version is stable
    finally:
        writer.close()
        stop.set()
        for t in readers:
            t.join(timeout=10)
    assert not errors, errors[:3]
    versions = {v for v, _, _ in seen}
    assert len(versions) >= 3, f"readers should have seen several versions, saw {versions}"
    # The passes really rebuild the layout (else a torn read could not show): cluster ids change.
    layouts = {tuple(expected[(v, "i17")] + expected[(v, "i2500")]) for v in versions}
    assert len(layouts) >= 2, layouts
    for version, key, answer in seen:
        assert answer == expected[(version, key)], f"answer at version {version} for {key} matches no commit"


def test_exact_mode_is_current_at_every_index_version(server, stores):
    """Exact mode (the yardstick of the sampled index recall) scores the index mirror in place: an item the
    writer re-prioritised a moment ago tops the very next exact answer. A copied item matrix had lagged up
    to ``serve.exact_refresh_s`` (30 s) behind the vectors the index path serves."""
    from mfli.deltas import ItemDelta

    settings, snap = stores
    before = server.get("/v1/recommend", params={"user_id": "u3", "k": 10, "mode": "exact"}).json()
    users = UsersStore(settings.learner.users_path, history=settings.model.history, readonly=True)
    try:
        seen = set(users.history("u3")[0])
    finally:
        users.close()
    answered = {i["item_id"] for i in before["items"]}
    row = next(r for r in range(N - 1, 0, -1) if f"i{r}" not in seen | answered)
    writer = IndexWriter(settings.index.path, settings.index)
    try:
        writer.apply([ItemDelta(item_id=f"i{row}", row=row, version=2**60, event_ts=1,
                                vectors=snap.vectors[row].astype(np.float32), codes=snap.codes[row].astype(np.int32),
                                prior=50.0)], None)
    finally:
        writer.close()
    after = server.get("/v1/recommend", params={"user_id": "u3", "k": 10, "mode": "exact"}).json()
    assert after["index_version"] > before["index_version"]
    assert after["items"][0]["item_id"] == f"i{row}" and after["items"][0]["score"] > 49
