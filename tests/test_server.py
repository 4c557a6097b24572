"""The HTTP server over an in-memory index: every route, every kind of bad input, fallback, freshness.

Real HTTP over loopback against the same ASGI app ``mfli serve`` runs (in-process uvicorn on a free port);
the catalogue is a seeded clustered one whose structure the answers must reflect. The LMDB-backed
process is tested in ``test_server_lmdb.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest

from mfli.benchmarks.workloads import synthetic_catalogue, synthetic_histories
from mfli.config import load_settings
from mfli.retrieval.memory import MemoryIndexView
from mfli.server.app import ServerApp
from mfli.server.openapi import openapi_bytes
from mfli.server.schemas import ItemResponse, RecommendResponse, SimilarResponse
from mfli.server.state import MemoryState

from test_server_harness import running

N = 3000
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalogue():
    snap = synthetic_catalogue(N, facets=3, dim=16, seed=3)
    view = MemoryIndexView(snap, target=16, b_low=4, b_upp=128)
    histories = synthetic_histories(snap, users=20, history=30, seed=4)
    return snap, view, histories


@pytest.fixture(scope="module")
def settings():
    return load_settings(serve={"max_k": 100, "default_k": 10, "clusters_per_request": 16,
                                "members_per_cluster": 64, "recall_sample_interval_s": 3600})


@pytest.fixture(scope="module")
def served(catalogue, settings):
    snap, view, histories = catalogue
    users = {f"u{i}": [(f"i{r}", 1000 + t) for t, r in enumerate(h.tolist())] for i, h in enumerate(histories)}
    state = MemoryState(snap, view, users, history=settings.model.history)
    app = ServerApp(settings, state, lambda: generate_latest(REGISTRY), openapi_bytes(settings.serve))
    with running(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        yield client, state, app


def _count(route: str, status: int) -> float:
    return REGISTRY.get_sample_value("mfli_requests_total", {"route": route, "status": str(status)}) or 0.0


# --- happy paths -----------------------------------------------------------------------------------------
def test_recommend_get_returns_ranked_items_from_the_users_neighbourhood(served, catalogue):
    client, _, _ = served
    snap, _, histories = catalogue
    resp = client.get("/v1/recommend", params={"user_id": "u0", "k": 15})
    assert resp.status_code == 200, resp.text
    body = RecommendResponse.model_validate(resp.json())
    assert len(body.items) == 15 and not body.fallback and body.mode == "index"
    scores = [it.score for it in body.items]
    assert scores == sorted(scores, reverse=True)
    seen = {f"i{r}" for r in histories[0].tolist()}
    assert not seen & {it.item_id for it in body.items}, "already-seen items must be excluded"
    # Structure: most answers share a level-1 code (facet 0) with some history item.
    hist_codes = set(snap.codes[histories[0], 0, 0].tolist())
    rows = [int(it.item_id[1:]) for it in body.items]
    assert np.mean([snap.codes[r, 0, 0] in hist_codes for r in rows]) >= 0.5
    assert any(it.source == "cluster" and it.facet is not None and it.cluster is not None for it in body.items)


def test_exact_mode_agrees_with_the_index_on_most_items(served):
    client, _, _ = served
    index = client.get("/v1/recommend", params={"user_id": "u1", "k": 10}).json()
    exact = client.get("/v1/recommend", params={"user_id": "u1", "k": 10, "mode": "exact"}).json()
    assert exact["mode"] == "exact" and all(it["source"] == "exact" for it in exact["items"])
    overlap = {i["item_id"] for i in index["items"]} & {i["item_id"] for i in exact["items"]}
    assert len(overlap) >= 6
    assert exact["items"][0]["score"] >= index["items"][0]["score"] - 1e-5  # exact is the upper bound


def test_post_recommend_with_triggers_and_exclude(served):
    client, _, _ = served
    base = client.post("/v1/recommend", json={"trigger_items": ["i10", "i11", "i12"], "k": 5}).json()
    first = base["items"][0]["item_id"]
    resp = client.post("/v1/recommend", json={"trigger_items": ["i10", "i11", "i12", "nope"], "k": 5,
                                              "exclude": [first, "also-unknown"]})
    assert resp.status_code == 200, resp.text
    body = RecommendResponse.model_validate(resp.json())
    ids = [it.item_id for it in body.items]
    assert len(ids) == 5 and first not in ids and not {"i10", "i11", "i12"} & set(ids)
    assert body.unknown_items == ["nope"] and body.user_id is None and not body.fallback


def test_similar_and_item_routes(served, catalogue):
    client, _, _ = served
    snap, view, _ = catalogue
    resp = client.get("/v1/items/i42/similar", params={"k": 8})
    assert resp.status_code == 200, resp.text
    body = SimilarResponse.model_validate(resp.json())
    assert body.item_id == "i42" and len(body.items) == 8 and "i42" not in {i.item_id for i in body.items}
    item = ItemResponse.model_validate(client.get("/v1/items/i42").json())
    assert item.row == 42 and item.codes == snap.codes[42].tolist()
    assert item.clusters == view.clusters_of(np.array([42]))[0].tolist()


def test_unknown_user_gets_flagged_fallback_of_popular_and_fresh_items(served, catalogue):
    client, _, _ = served
    snap, _, _ = catalogue
    before = REGISTRY.get_sample_value("mfli_fallbacks_total") or 0.0
    body = client.get("/v1/recommend", params={"user_id": "never-seen", "k": 8}).json()
    assert body["fallback"] is True and len(body["items"]) == 8
    sources = [it["source"] for it in body["items"]]
    assert sources.count("fresh") == 2 and sources.count("trending") == 6
    top_prior = {f"i{r}" for r in np.argsort(-snap.prior)[:6].tolist()}
    assert {it["item_id"] for it in body["items"] if it["source"] == "trending"} == top_prior
    fresh = {it["item_id"] for it in body["items"] if it["source"] == "fresh"}
    assert all(int(i[1:]) >= N - 10 for i in fresh), fresh  # newest rows
    assert (REGISTRY.get_sample_value("mfli_fallbacks_total") or 0.0) == before + 1


def test_health_openapi_and_metrics(served, settings):
    client, _, _ = served
    assert client.get("/livez").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ok" and ready["items"] == N and ready["codebook_version"] is not None
    doc = client.get("/openapi.json").json()
    assert {"/v1/recommend", "/v1/items/{item_id}/similar", "/v1/items/{item_id}", "/readyz"} <= set(doc["paths"])
    client.get("/v1/recommend", params={"user_id": "u2"})
    text = client.get("/metrics").text
    assert 'mfli_request_seconds_bucket{le="0.005",route="recommend"}' in text
    assert 'mfli_requests_total{route="recommend",status="200"}' in text
    assert "mfli_candidates_per_request_count" in text


def test_committed_openapi_document_is_current():
    """docs/openapi.json is generated: regenerate with `mfli serve --write-openapi docs/openapi.json`."""
    committed = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert committed == json.loads(openapi_bytes(load_settings().serve))


# --- bad input: 4xx with a JSON message, never 5xx ---------------------------------------------------------
BAD_GETS = [
    ("/v1/recommend", {"user_id": "u0", "k": "0"}, 400, "k must be between"),
    ("/v1/recommend", {"user_id": "u0", "k": "-3"}, 400, "k must be between"),
    ("/v1/recommend", {"user_id": "u0", "k": "101"}, 400, "k must be between"),
    ("/v1/recommend", {"user_id": "u0", "k": "10000000000000000000000"}, 400, "k must be between"),
    ("/v1/recommend", {"user_id": "u0", "k": "2.5"}, 400, "k:"),
    ("/v1/recommend", {"user_id": "u0", "k": "ten"}, 400, "k:"),
    ("/v1/recommend", {"user_id": "u0", "mode": "ann"}, 400, "mode:"),
    ("/v1/recommend", {"user_id": "u0", "deterministic": "maybe"}, 400, "deterministic:"),
    ("/v1/recommend", {"k": "5"}, 400, "user_id:"),
    ("/v1/recommend", {"user_id": ""}, 400, "user_id:"),
    ("/v1/recommend", {"user_id": "u0", "colour": "red"}, 400, "colour:"),
    ("/v1/recommend", [("user_id", "u0"), ("k", "3"), ("k", "4")], 400, "more than once"),
    ("/v1/items/i1/similar", {"k": "0"}, 400, "k must be between"),
    ("/v1/items/i1/similar", {"k": "x"}, 400, "k:"),
    ("/v1/items/i1/similar", {"mode": "fast"}, 400, "mode:"),
    ("/v1/items/no-such-item/similar", {}, 404, "unknown item_id"),
    ("/v1/items/no-such-item", {}, 404, "unknown item_id"),
    ("/v1/items/i1", {"verbose": "1"}, 400, "verbose:"),
    ("/v2/recommend", {}, 404, "no route"),
    ("/v1/items/i1/neighbours", {}, 404, "no route"),
]


@pytest.mark.parametrize("path,params,status,message", BAD_GETS)
def test_bad_get_requests_get_a_json_4xx(served, path, params, status, message):
    client, _, _ = served
    resp = client.get(path, params=params)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert message in resp.json()["error"]


BAD_BODIES = [
    (b"{not json", "body"),
    (b"[]", "body"),
    (b'{"user_id": 5, "k": 3}', "user_id:"),
    (b'{"user_id": "u0", "k": "3"}', "k:"),
    (b'{"user_id": "u0", "k": 0}', "k must be between"),
    (b'{"user_id": "u0", "k": 1000}', "k must be between"),
    (b'{"user_id": "u0", "k": 2.5}', "k:"),
    (b'{"trigger_items": "i1", "k": 3}', "trigger_items:"),
    (b'{"trigger_items": [1, 2], "k": 3}', "trigger_items.0:"),
    (b'{"user_id": "u0", "exclude": {"a": 1}}', "exclude:"),
    (b'{"user_id": "u0", "mode": "approx"}', "mode:"),
    (b'{"user_id": "u0", "surprise": true}', "surprise:"),
    (b'{"k": 3}', "give user_id, trigger_items or both"),
    (b"", "body"),
]


@pytest.mark.parametrize("raw,message", BAD_BODIES)
def test_bad_post_bodies_get_a_json_400(served, raw, message):
    client, _, _ = served
    resp = client.post("/v1/recommend", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]


def test_oversized_body_and_wrong_methods(served, settings):
    client, _, _ = served
    huge = b'{"user_id": "u0", "exclude": ["' + b"x" * settings.serve.max_body_bytes + b'"]}'
    resp = client.post("/v1/recommend", content=huge)
    assert resp.status_code == 413 and "larger than" in resp.json()["error"]
    for method, path in [("DELETE", "/v1/recommend"), ("POST", "/v1/items/i1"), ("POST", "/v1/items/i1/similar"),
                         ("POST", "/livez"), ("PUT", "/metrics")]:
        resp = client.request(method, path)
        assert resp.status_code == 405, (method, path, resp.text)
        assert "not allowed" in resp.json()["error"]


def test_bad_input_is_counted_as_4xx_never_5xx(served):
    client, _, _ = served
    before = _count("recommend", 400)
    client.get("/v1/recommend", params={"user_id": "u0", "k": "nope"})
    assert _count("recommend", 400) == before + 1
    text = client.get("/metrics").text
    assert 'status="500"' not in text


# --- freshness -------------------------------------------------------------------------------------------
def test_new_users_first_event_changes_their_answer(served, catalogue):
    client, state, _ = served
    before = client.get("/v1/recommend", params={"user_id": "newcomer", "k": 10}).json()
    assert before["fallback"] is True
    state.add_event("newcomer", "i77", ts=5000)  # what the learner writes to the users store
    after = client.get("/v1/recommend", params={"user_id": "newcomer", "k": 10}).json()
    assert after["fallback"] is False
    assert "i77" not in {it["item_id"] for it in after["items"]}
    assert {it["item_id"] for it in after["items"]} != {it["item_id"] for it in before["items"]}
