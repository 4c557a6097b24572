"""The server's wire contract: request validation (pydantic) and response shapes.

Requests are validated here and nowhere else, so every malformed input becomes one kind of error
(:class:`BadRequest`, a 4xx with ``{"error": ...}``) instead of an exception deep in numpy turning into a 500.
Responses are plain dicts serialised once with orjson: building pydantic models per response would
cost more than the retrieval itself at 5k req/s. The response models below exist to *document* the
shapes in the OpenAPI document (:mod:`mfli.server.openapi`); a test checks real answers against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

_ID = Field(min_length=1, max_length=256)


class HttpError(Exception):
    """An answer with a 4xx status and a JSON ``{"error": message}`` body."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(HttpError):
    status = 400


class NotFound(HttpError):
    status = 404


class MethodNotAllowed(HttpError):
    status = 405


class PayloadTooLarge(HttpError):
    status = 413


class Unavailable(HttpError):
    """503: the index is not open (yet). Not a server bug, so it is an HttpError too."""

    status = 503


def describe(exc: ValidationError) -> str:
    """One readable line per pydantic error: ``k: Input should be a valid integer``."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# --- requests ------------------------------------------------------------------------------------------
class RecommendParams(BaseModel):
    """Query string of ``GET /v1/recommend``. ``k`` is bounded by ``serve.max_k`` in the handler."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = _ID
    k: int | None = Field(None, description="number of items (1..max_k); default serve.default_k")
    mode: Literal["index", "exact"] = Field("index", description="index = learned index; exact = brute force")
    deterministic: bool = Field(True, description="top-count clusters instead of sampling by counts")


class RecommendBody(BaseModel):
    """JSON body of ``POST /v1/recommend``: a user, explicit triggers, or both (triggers come after history)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: str | None = Field(None, min_length=1, max_length=256)
    trigger_items: list[str] = Field(default_factory=list, max_length=1000)
    exclude: list[str] = Field(default_factory=list, max_length=10_000)
    k: int | None = None
    mode: Literal["index", "exact"] = "index"
    deterministic: bool = True


class SimilarParams(BaseModel):
    """Query string of ``GET /v1/items/{item_id}/similar``."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = None
    mode: Literal["index", "exact"] = "index"


class NoParams(BaseModel):
    """Routes that take no query parameters reject unknown ones (typos should not pass silently)."""

    model_config = ConfigDict(extra="forbid")


# --- responses (documentation and tests; handlers build dicts of the same shape) -----------------------
class ScoredItem(BaseModel):
    item_id: str
    score: float
    facet: int | None = Field(description="facet whose cluster supplied the item; null for trending/fallback")
    cluster: int | None = Field(description="cluster of origin within that facet; null if none")
    source: Literal["cluster", "trending", "fresh", "exact"]


class RecommendResponse(BaseModel):
    user_id: str | None
    items: list[ScoredItem]
    mode: Literal["index", "exact"]
    fallback: bool = Field(description="true when the user had no usable history: popular + fresh items")
    candidates: int = Field(description="items reranked to produce the answer")
    index_version: int
    unknown_items: list[str] = Field(default_factory=list, description="trigger ids not in the index (ignored)")


class SimilarResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    mode: Literal["index", "exact"]
    candidates: int
    index_version: int


class ItemResponse(BaseModel):
    item_id: str
    row: int
    codes: list[list[int]] = Field(description="RQ code path per facet (F x L)")
    clusters: list[int] = Field(description="cluster per facet (-1 if not indexed)")
    prior: float
    version: int = Field(description="learner version of the item's state")
    updated_ts: int = Field(description="epoch ms of the newest event that changed the item")
    index_version: int


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    index_version: int | None = None
    codebook_version: int | None = None
    items: int | None = None
    reason: str | None = None


class ErrorBody(BaseModel):
    error: str
