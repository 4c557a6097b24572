"""The OpenAPI 3.1 document of the server, generated from the pydantic models in :mod:`.schemas`.

Generated rather than hand-written so the document cannot drift from the validation code; the committed
copy (``docs/openapi.json``) is regenerated with ``mfli serve --write-openapi docs/openapi.json`` and a
test fails when it is out of date.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel

from mfli.config import ServeSettings

from .schemas import ErrorBody, Health, ItemResponse, RecommendBody, RecommendResponse, SimilarResponse

_COMPONENTS = [RecommendBody, RecommendResponse, SimilarResponse, ItemResponse, Health, ErrorBody]


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*codes: int) -> dict:
    meaning = {400: "invalid parameter or body", 404: "unknown item or path", 405: "wrong method",
               413: "body too large", 503: "index not ready"}
    return {str(c): _json(ErrorBody, meaning[c]) for c in codes}


def _param(name: str, where: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


def build_openapi(serve: ServeSettings) -> dict[str, Any]:
    """The document as a dict; bounds on ``k`` come from the settings it is built with."""
    k = _param("k", "query", {"type": "integer", "minimum": 1, "maximum": serve.max_k, "default": serve.default_k},
               "number of items to return")
    mode = _param("mode", "query", {"type": "string", "enum": ["index", "exact"], "default": "index"},
                  "index: learned index (clusters + rerank); exact: brute force over all items (yardstick)")
    item_id = _param("item_id", "path", {"type": "string", "minLength": 1, "maxLength": 256},
                     "external item id (URL-encoded)", required=True)
    schemas: dict[str, Any] = {}
    for model in _COMPONENTS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return {
        "openapi": "3.1.0",
        "info": {"title": "mfli server", "version": "1",
                 "description": "Retrieval from the live multifaceted learnable index (no ANN search). "
                                "Every error is a JSON object {\"error\": message}."},
        "paths": {
            "/v1/recommend": {
                "get": {
                    "summary": "Top-k items for a user from their recent history",
                    "description": "Unknown or history-less users get recently popular and fresh items "
                                   "with fallback=true.",
                    "parameters": [
                        _param("user_id", "query", {"type": "string", "minLength": 1, "maxLength": 256},
                               "external user id", required=True),
                        k, mode,
                        _param("deterministic", "query", {"type": "boolean", "default": True},
                               "take the top-count trigger clusters instead of sampling them by count"),
                    ],
                    "responses": {"200": _json(RecommendResponse, "ranked items"), **_errors(400, 503)},
                },
                "post": {
                    "summary": "Top-k items for a user and/or explicit trigger items",
                    "requestBody": {"required": True,
                                    "content": {"application/json": {"schema": _ref(RecommendBody)}}},
                    "responses": {"200": _json(RecommendResponse, "ranked items"),
                                  **_errors(400, 413, 503)},
                },
            },
            "/v1/items/{item_id}/similar": {
                "get": {
                    "summary": "Items similar to one item (the item as the only trigger)",
                    "parameters": [item_id, k, mode],
                    "responses": {"200": _json(SimilarResponse, "ranked items"), **_errors(400, 404, 503)},
                },
            },
            "/v1/items/{item_id}": {
                "get": {
                    "summary": "An item's codes, clusters, version and last update",
                    "parameters": [item_id],
                    "responses": {"200": _json(ItemResponse, "item state"), **_errors(400, 404, 503)},
                },
            },
            "/livez": {"get": {"summary": "The process is up", "responses": {"200": _json(Health, "alive")}}},
            "/readyz": {"get": {"summary": "Index open and codebook loaded",
                                "responses": {"200": _json(Health, "ready"), "503": _json(Health, "not ready")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text exposition format)",
                                 "responses": {"200": {"description": "metrics",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        },
        "components": {"schemas": schemas},
    }


def openapi_bytes(serve: ServeSettings) -> bytes:
    """Pre-serialised (and stable: sorted keys, indented) so it can be committed and diffed."""
    return orjson.dumps(build_openapi(serve), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
