"""The HTTP application: a small hand-routed ASGI app on uvicorn (httptools + uvloop).

Why not Starlette or aiohttp routing? Measured on this 2-core box (wrk -t1 -c32 -d4s, one worker, median
of 3 runs, load average ~3 from other engineers' jobs; scratch apps in the report of issue 5):

=====================================  ===============  =====================  =====================
stack                                  hello JSON req/s  4000x192 numpy req/s   numpy route p99
=====================================  ===============  =====================  =====================
uvicorn+httptools+uvloop, raw ASGI     ~27k / 14k        ~5.6k / 3.0k           8-12 ms / 22-54 ms
Starlette on the same uvicorn          ~19k / 6.5k       ~1.1k* / 1.9k          (noisy) / 40-64 ms
aiohttp (uvloop)                       ~23k / 17k        ~0.6k* / 4.8k          (noisy) / 16-23 ms
bare asyncio.Protocol + httptools      ~60k / 54k        ~0.6k* / 4.0k          (noisy) / 12-59 ms
=====================================  ===============  =====================  =====================

(two sessions: before / after pinning BLAS to one thread; * = multi-threaded BLAS spin-waiting on the
busy box, which is why ``mfli serve`` pins BLAS to one thread per worker.) Framework overhead is
20-50 µs per request against ~0.3-1 ms of retrieval, so the choice matters at the margin only. The raw
ASGI app keeps uvicorn's process management (``--workers``), keep-alive and HTTP parsing hardened by
others, and skips Starlette's per-request Request/Response objects (measured 1.3-2x on hello). A bare
protocol is faster on hello but would make us own HTTP/1.1 edge cases; not worth it for 20 µs.

Every route answers JSON; every client mistake is a 4xx with ``{"error": ...}``; an unexpected exception is
logged and still answers 500 with a JSON body (tests assert this never happens for bad input).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import orjson
from pydantic import BaseModel, ValidationError

from mfli.config import Settings
from mfli.metrics import READY, REQUEST_SECONDS, REQUESTS, UP
from mfli.retrieval.warmup import warm_up

from .monitor import Monitor
from .schemas import (
    BadRequest,
    HttpError,
    MethodNotAllowed,
    NoParams,
    NotFound,
    PayloadTooLarge,
    RecommendBody,
    RecommendParams,
    SimilarParams,
    Unavailable,
    describe,
)
from .service import RecommendService
from .state import StateSource

log = logging.getLogger(__name__)

JSON_HEADERS = [(b"content-type", b"application/json")]
METRICS_HEADERS = [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")]
Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


def parse_query(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a query string against a pydantic model; repeated keys are an error, not last-wins."""
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    data: dict[str, str] = {}
    for key, value in pairs:
        if key in data:
            raise BadRequest(f"{key}: given more than once")
        data[key] = value
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(describe(exc)) from None


class ServerApp:
    """ASGI callable. ``metrics_body`` renders /metrics (single- or multi-process registry)."""

    def __init__(self, settings: Settings, source: StateSource, metrics_body: Callable[[], bytes],
                 openapi: bytes, monitor: bool = True, monitor_lock: Path | None = None) -> None:
        self.settings = settings
        self.source = source
        self.service = RecommendService(settings)
        self.metrics_body = metrics_body
        self.openapi = openapi
        self.monitor = Monitor(settings, source, self.service, monitor_lock) if monitor else None
        self._timers: dict[str, Any] = {}
        self._counters: dict[tuple[str, int], Any] = {}
        self._fixed: dict[str, tuple[str, dict[str, Callable]]] = {
            "/v1/recommend": ("recommend", {"GET": self._recommend_get, "POST": self._recommend_post}),
            "/livez": ("livez", {"GET": self._livez}),
            "/readyz": ("readyz", {"GET": self._readyz}),
            "/metrics": ("metrics", {"GET": self._metrics}),
            "/openapi.json": ("openapi", {"GET": self._openapi}),
        }

    # --- ASGI entry ------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    seconds = warm_up()  # compile/load the retrieval kernels before the first request
                    log.info("retrieval kernels ready in %.2f s", seconds)
                    self.source.open()  # after fork: LMDB environments must not cross a fork
                    if self.monitor is not None:
                        self.monitor.start()
                    UP.labels("server").set(1)
                except Exception as exc:  # noqa: BLE001 - reported to uvicorn, which exits
                    log.exception("server startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.monitor is not None:
                    self.monitor.stop()
                self.source.close()
                UP.labels("server").set(0)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route, handler = self._route(scope)
        status, body, headers = 500, b'{"error":"internal error"}', JSON_HEADERS
        try:
            status, body, headers = await handler(scope, receive)
        except HttpError as exc:
            status, body = exc.status, orjson.dumps({"error": exc.message})
        except Exception:  # noqa: BLE001 - a bug must not kill the connection without an answer
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._observe(route, status, time.perf_counter() - started)

    def _observe(self, route: str, status: int, seconds: float) -> None:
        # Resolving label children costs a lock and a dict lookup each; cache them (routes are bounded).
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = REQUEST_SECONDS.labels(route)
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[(route, status)] = REQUESTS.labels(route, str(status))
        timer.observe(seconds)
        counter.inc()

    # --- routing -----------------------------------------------------------------------------------------
    def _route(self, scope: dict) -> tuple[str, Callable]:
        path: str = scope["path"]
        method: str = scope["method"]
        if path in self._fixed:
            name, methods = self._fixed[path]
            return name, methods.get(method) or self._not_allowed(methods)
        if path.startswith("/v1/items/"):
            # Split the *raw* path so an item id may contain an encoded '/'.
            raw = scope.get("raw_path") or path.encode()
            parts = raw.split(b"?", 1)[0].split(b"/")[3:]
            if len(parts) == 1 and parts[0]:
                item_id = unquote(parts[0].decode("latin-1"))
                return "item", self._item(item_id) if method == "GET" else self._not_allowed({"GET": None})
            if len(parts) == 2 and parts[0] and parts[1] == b"similar":
                item_id = unquote(parts[0].decode("latin-1"))
                return "similar", self._similar(item_id) if method == "GET" else self._not_allowed({"GET": None})
        return "not_found", self._unknown_path

    @staticmethod
    def _not_allowed(methods: dict) -> Callable:
        async def handler(scope: dict, receive: Receive) -> tuple:
            raise MethodNotAllowed(f"method {scope['method']} not allowed; use {', '.join(methods)}")

        return handler

    async def _unknown_path(self, scope: dict, receive: Receive) -> tuple:
        raise NotFound(f"no route {scope['path']!r}; see /openapi.json")

    def _ok(self, payload: Any) -> tuple[int, bytes, list]:
        return 200, orjson.dumps(payload), JSON_HEADERS

    def _require_ready(self) -> None:
        # a replica answers from its last applied state while it catches up (only /readyz says it lags)
        ok, reason = getattr(self.source, "serving", self.source.ready)()
        if not ok:
            raise Unavailable(f"index not ready: {reason}")

    # --- handlers ----------------------------------------------------------------------------------------
    async def _recommend_get(self, scope: dict, receive: Receive) -> tuple:
        params: RecommendParams = parse_query(scope["query_string"], RecommendParams)
        k = self.service.check_k(params.k)
        self._require_ready()
        with self.source.read() as state:
            out = self.service.recommend(state, params.user_id, [], [], k, params.mode, params.deterministic)
        if self.monitor is not None:
            self.monitor.served(params.user_id, out)
        return self._ok(out)

    async def _recommend_post(self, scope: dict, receive: Receive) -> tuple:
        parse_query(scope["query_string"], NoParams)
        raw = await self._body(receive)
        try:
            body = RecommendBody.model_validate_json(raw)
        except ValidationError as exc:
            raise BadRequest(describe(exc)) from None
        if body.user_id is None and not body.trigger_items:
            raise BadRequest("give user_id, trigger_items or both")
        k = self.service.check_k(body.k)
        self._require_ready()
        with self.source.read() as state:
            out = self.service.recommend(state, body.user_id, body.trigger_items, body.exclude, k, body.mode,
                                         body.deterministic)
        return self._ok(out)

    async def _body(self, receive: Receive) -> bytes:
        limit = self.settings.serve.max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body larger than {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    def _similar(self, item_id: str) -> Callable:
        async def handler(scope: dict, receive: Receive) -> tuple:
            params: SimilarParams = parse_query(scope["query_string"], SimilarParams)
            k = self.service.check_k(params.k)
            self._require_ready()
            with self.source.read() as state:
                return self._ok(self.service.similar(state, item_id, k, params.mode))

        return handler

    def _item(self, item_id: str) -> Callable:
        async def handler(scope: dict, receive: Receive) -> tuple:
            parse_query(scope["query_string"], NoParams)
            self._require_ready()
            with self.source.read() as state:
                return self._ok(self.service.item(state, item_id))

        return handler

    async def _livez(self, scope: dict, receive: Receive) -> tuple:
        return 200, b'{"status":"ok"}', JSON_HEADERS

    async def _readyz(self, scope: dict, receive: Receive) -> tuple:
        ok, reason = self.source.ready()
        READY.labels("server").set(1 if ok else 0)
        if not ok:
            return 503, orjson.dumps({"status": "unavailable", "reason": reason}), JSON_HEADERS
        with self.source.read() as state:
            return self._ok({"status": "ok", "index_version": state.index_version,
                             "codebook_version": state.codebook_version, "items": state.n_items()})

    async def _metrics(self, scope: dict, receive: Receive) -> tuple:
        return 200, self.metrics_body(), METRICS_HEADERS

    async def _openapi(self, scope: dict, receive: Receive) -> tuple:
        return 200, self.openapi, JSON_HEADERS
