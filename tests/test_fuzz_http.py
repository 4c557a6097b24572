"""HTTP fuzzing of every route of a real ``mfli serve`` process against the committed OpenAPI document.

Why hypothesis and not schemathesis: schemathesis generates mostly schema-*valid* requests plus a fixed set
of negative mutations, and pulls a large dependency tree; what we need to know is narrower and harsher —
that *no* request, valid or not, gets an undocumented status. So the strategies below are derived from
``docs/openapi.json`` (every operation, its parameters and their schemas) and mix

* schema-valid values (ids known to the index, unknown ids, every enum value, k in range),
* schema-invalid ones (k = 0 / -1 / 10**30 / "abc" / "", unknown modes, bools spelled wrong, ids of 0 or
  300 characters and up to 2 KB of UTF-8, percent-encoded junk and ``%FF`` in paths, unknown and repeated
  query keys),
* for ``POST /v1/recommend``: bodies built from the request schema, wrong types, extra keys, huge lists,
  non-JSON bytes, invalid UTF-8, deep JSON, and bodies above ``serve.max_body_bytes``,
* wrong methods and paths outside the document,

and assert: the status is one the document lists for that operation (404/405 for unknown paths and
methods, which are the app's documented-by-policy answers), never 5xx (503 only from a server whose index
is not ready), every body is JSON, errors carry ``{"error": ...}``, and 200 bodies validate against the
response models the document was generated from.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfli.benchmarks.serve import write_lmdb
from mfli.benchmarks.workloads import synthetic_catalogue, synthetic_histories
from mfli.config import load_settings
from mfli.server.schemas import Health, ItemResponse, RecommendResponse, SimilarResponse

from test_server_harness import serve_process

pytestmark = pytest.mark.slow

DOC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
N_ITEMS = 1500
OK_MODELS = {"/v1/recommend": RecommendResponse, "/v1/items/{item_id}": ItemResponse,
             "/v1/items/{item_id}/similar": SimilarResponse, "/readyz": Health}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-http")
    s = load_settings(index={"path": str(root / "index.lmdb"), "map_size": 1 << 28, "target_cluster_size": 16},
                      learner={"users_path": str(root / "users.lmdb")})
    snap = synthetic_catalogue(N_ITEMS, facets=3, dim=16, seed=11)
    write_lmdb(snap, s.index.path, s.learner.users_path, synthetic_histories(snap, users=20, history=20, seed=12), s)
    return s, [str(i) for i in snap.item_ids[:50]]


@pytest.fixture(scope="module")
def ready_server(catalogue):
    s, _ = catalogue
    with serve_process(s.index.path, s.learner.users_path, map_size=1 << 28) as client:
        yield client


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    """A server whose index does not exist yet: 503 is then a documented, expected answer."""
    root = tmp_path_factory.mktemp("fuzz-http-empty")
    with serve_process(root / "none.lmdb", root / "none-users.lmdb", map_size=1 << 28, wait_path="/livez") as client:
        yield client


# --- strategies from the document -----------------------------------------------------------------------
def _operations() -> list[tuple[str, str, dict]]:
    return [(path, method.upper(), op) for path, ops in DOC["paths"].items() for method, op in ops.items()]


OPERATIONS = _operations()
_weird = st.text(st.characters(codec="utf-8"), min_size=0, max_size=30)
_long_id = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\U0001f600", "%", "/"]), st.integers(200, 700))


def _ids(known: list[str]):
    return st.one_of(st.sampled_from(known), st.sampled_from(["u1", "u3", "nobody", "i0"]), _weird, _long_id)


def _param_value(schema: dict, ids):
    t = schema.get("type")
    if "enum" in schema:
        good = st.sampled_from(schema["enum"])
    elif t == "integer":
        good = st.integers(schema.get("minimum", -5) - 2, schema.get("maximum", 5) + 2).map(str)
    elif t == "boolean":
        good = st.sampled_from(["true", "false", "1", "0", "yes", "no", "on"])
    else:
        good = ids
    junk = st.one_of(st.just(""), _weird, st.sampled_from(["-1", "0", "1e3", "10" * 20, "nan", "null", "[]", "{}"]))
    return st.one_of(good, good, junk)


@st.composite
def request(draw, known: list[str]) -> tuple[str, str, str, list[tuple[str, str]], bytes | None, dict]:
    """(documented path template, method, concrete url path, query pairs, body, operation)."""
    path, method, op = draw(st.sampled_from(OPERATIONS))
    ids = _ids(known)
    url = path
    query: list[tuple[str, str]] = []
    for p in op.get("parameters", []):
        if p["in"] == "path":
            value = draw(_param_value(p["schema"], ids))
            raw = quote(value, safe="") if value else draw(st.sampled_from(["%FF", "%00", "a%2Fb"]))
            url = url.replace("{" + p["name"] + "}", raw)
        elif p["in"] == "query" and (p.get("required") or draw(st.booleans())):
            query.append((p["name"], draw(_param_value(p["schema"], ids))))
    if draw(st.integers(0, 5)) == 0:
        query.append((draw(st.sampled_from(["k", "user_id", "bogus", "", "mode"])), draw(_weird)))
    body = None
    if "requestBody" in op:
        body = draw(st.one_of(_valid_body(known), _valid_body(known), _json_body(known), _junk_body()))
    if draw(st.integers(0, 12)) == 0:  # a method the operation does not have
        method = draw(st.sampled_from(["PUT", "DELETE", "PATCH", "POST" if method == "GET" else "GET"]))
    return path, method, url, query, body, op


@st.composite
def _json_body(draw, known: list[str]) -> bytes:
    ids = _ids(known)
    body: dict = {}
    fields = {
        "user_id": st.one_of(ids, st.none(), st.integers(), st.just("")),
        "trigger_items": st.one_of(st.lists(ids, max_size=8), st.lists(st.integers(), max_size=3), st.text(max_size=5),
                                   st.builds(lambda n: ["i0"] * n, st.integers(999, 1002))),
        "exclude": st.one_of(st.lists(ids, max_size=5), st.none()),
        "k": st.one_of(st.integers(-2, 1002), st.floats(allow_nan=False), st.text(max_size=4), st.booleans()),
        "mode": st.one_of(st.sampled_from(["index", "exact"]), _weird),
        "deterministic": st.one_of(st.booleans(), st.sampled_from(["true", 1, None])),
        "extra": st.integers(),
    }
    for name, strat in fields.items():
        if draw(st.booleans()):
            body[name] = draw(strat)
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _valid_body(known: list[str]):
    """Bodies the request schema accepts (so 200 answers get exercised and validated too)."""
    return st.fixed_dictionaries({}, optional={
        "user_id": st.one_of(st.sampled_from(["u1", "u3", "nobody"]), st.text(min_size=1, max_size=20)),
        "trigger_items": st.lists(st.one_of(st.sampled_from(known), _weird), min_size=1, max_size=10),
        "exclude": st.lists(st.sampled_from(known), max_size=10),
        "k": st.integers(1, 1000), "mode": st.sampled_from(["index", "exact"]), "deterministic": st.booleans(),
    }).filter(lambda b: b.get("user_id") or b.get("trigger_items")).map(
        lambda b: json.dumps(b, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _junk_body():
    return st.one_of(
        st.binary(max_size=64), st.just(b""), st.just(b"\xff\xfe{}"), st.just(b'{"user_id": "u1"'),
        st.just(b"[" * 5000 + b"]" * 5000), st.just(b'{"user_id":"\\ud800"}'), st.just(b"null"), st.just(b"[]"),
        st.builds(lambda n: b'{"user_id":"u1","exclude":["' + b"x" * n + b'"]}', st.integers(1 << 20, (1 << 20) + 10)),
    )


STATUSES: dict[str, Counter] = defaultdict(Counter)  # "server METHOD path" -> status -> count (report)
REPORT = Path(__file__).resolve().parent.parent / "reports" / "http_fuzz.json"


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if STATUSES:
        REPORT.parent.mkdir(parents=True, exist_ok=True)
        table = {k: {str(s): n for s, n in sorted(v.items())} for k, v in sorted(STATUSES.items())}
        REPORT.write_text(json.dumps(table, indent=2) + "\n")
        print("\nHTTP fuzz: status counts per operation (also in reports/http_fuzz.json)")
        for key, counts in table.items():
            print(f"  {key:<45} " + ", ".join(f"{s}={n}" for s, n in counts.items()))


def _check(resp: httpx.Response, path: str, method: str, op: dict, ready: bool) -> None:
    STATUSES[f"{'ready' if ready else 'not-ready'} {method} {path}"][resp.status_code] += 1
    documented = {int(s) for s in op["responses"]}
    allowed_methods = {m.upper() for m in DOC["paths"][path]}
    status = resp.status_code
    where = f"{method} {resp.request.url} -> {status}: {resp.text[:300]}"
    assert status < 500 or (status == 503 and not ready and 503 in documented), where
    if method not in allowed_methods:
        assert status == 405, where
    else:
        assert status in documented or status == 404, where  # 404: a path param that is not an id at all
    ctype = resp.headers.get("content-type", "")
    if path == "/metrics" and status == 200:
        assert ctype.startswith("text/plain"), where
        return
    body = resp.json()  # every answer is JSON
    if status >= 400:
        assert isinstance(body.get("error", body.get("reason")), str), where
    elif path in OK_MODELS:
        OK_MODELS[path].model_validate(body)


def _send(client: httpx.Client, method: str, url: str, query, body) -> httpx.Response:
    headers = {"content-type": "application/json"} if body is not None else {}
    qs = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in query)
    return client.request(method, url + ("?" + qs if qs else ""), content=body, headers=headers)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_route_answers_only_documented_statuses(ready_server, catalogue, data):
    _, known = catalogue
    path, method, url, query, body, op = data.draw(request(known))
    _check(_send(ready_server, method, url, query, body), path, method, op, ready=True)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_not_ready_server_answers_503_never_500(empty_server, data):
    path, method, url, query, body, op = data.draw(request(["i0", "i1"]))
    _check(_send(empty_server, method, url, query, body), path, method, op, ready=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.text(max_size=40).map(lambda t: "/" + quote(t, safe="/%")),
                     st.sampled_from(["/v1", "/v1/", "/v1/items", "/v1/items/", "/v1/items//similar",
                                      "/v1/items/a/b/c", "/v1/items/a/similar/", "/V1/recommend", "/v1/recommend/",
                                      "/v1/items/%FF%FE", "/v1/items/%00/similar", "/../etc/passwd"])))
def test_paths_outside_the_document_are_404_json(ready_server, raw):
    if raw in DOC["paths"]:
        return  # documented paths are covered above
    resp = ready_server.get(raw)
    assert resp.status_code in (400, 404, 405), (raw, resp.status_code, resp.text)
    assert "error" in resp.json()
