"""HTTP/JSON front door of the search service (FastAPI, described by OpenAPI at `/openapi.json`), and the web page.

Routes: `POST /v1/search` (JSON query), `POST /v1/search/image` (raw image bytes), `GET /v1/thumbnails/{point_id}`,
`POST /v1/embeddings` (the OpenAI request/response shape; images as a documented extension), `GET /v1/info`,
`GET /healthz` (liveness), `GET /readyz` (readiness), `GET /metrics` (Prometheus), and the page at `/`.
With a token, every route but health, readiness and the page's static files needs `Authorization: Bearer <token>`,
the same token the gRPC side checks.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from imgtxt.errors import InvalidInput, LimitExceeded
from imgtxt.serving.auth import TokenChecker
from imgtxt.serving.interceptors import AdmissionGate, ServerStopping
from search.backend import NotFound, SearchBackend, SearchResult, hit_fields
from search.backend import Query as SearchQuery
from search_service.prometheus import SearchMetrics

logger = logging.getLogger(__name__)

STATIC = resources.files("search_service") / "static"
OPEN_PATHS = ("/healthz", "/readyz", "/static/", "/favicon.ico")


class SearchBody(BaseModel):
    """A search: exactly one of `text`, `image_base64`, `vector`, `point_id`."""

    text: str | None = Field(None, description="text query")
    image_base64: str | None = Field(None, description="encoded image file, base64")
    vector: list[float] | None = Field(None, description="a vector of the collection's space")
    point_id: str | None = Field(None, description="'more like this': an indexed point's id")
    target: Literal["image", "text", "unit"] | None = Field(None, description="kind of points to search")
    limit: int = Field(10, description="most hits")
    filters: dict[str, str | int | bool] = Field(default_factory=dict, description="payload equality filters")


class HitOut(BaseModel):
    """One hit."""

    id: str
    score: float
    kind: str
    key: str
    image_key: str
    caption: str
    thumbnail: str | None = Field(None, description="URL of the hit's thumbnail, when it shows an image")
    payload: dict[str, Any]


class SearchOut(BaseModel):
    """Hits, best first."""

    hits: list[HitOut]
    target: str
    collection: str
    latency_ms: float


class EmbeddingsBody(BaseModel):
    """OpenAI `POST /v1/embeddings` request. Extension: `input` items may be `{"image": "<base64 image file>"}`."""

    input: str | list[str] | list[dict[str, str]]
    model: str | None = Field(None, description="ignored unless set: must name the served bundle version")
    encoding_format: Literal["float", "base64"] = "float"


def _decode_b64(value: str, field: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{field} is not valid base64 ({exc})") from None


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def create_app(
    backend: SearchBackend,
    metrics: SearchMetrics,
    *,
    tokens: TokenChecker | None = None,
    gate: AdmissionGate | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> FastAPI:
    """The HTTP application over `backend` (served by uvicorn in `search_service.server`).

    Args:
        backend: The domain object.
        metrics: Metrics of both protocols.
        tokens: The server shell's token checker (None: no auth); checked before anything else of a request.
        gate: The server shell's admission gate: once it closes, requests get 503 (retry elsewhere), while those
            admitted before finish.
        ready: Whether the shell reports SERVING (`/readyz` says 503 from the drain on).
    """
    app = FastAPI(
        title="imgtxt search",
        version="1",
        description="Image–text search: one nearest-neighbour look-up per query, over images, captions or units.",
    )
    started = time.time()

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        t0 = time.perf_counter()
        guarded = path != "/" and not path.startswith(OPEN_PATHS)
        if guarded and tokens is not None and not tokens.check(request.headers.get("authorization")):
            metrics.http(metrics.errors, path, "401").inc()
            return _error(401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')", "auth")
        if guarded and gate is not None:
            try:
                gate.enter()
            except ServerStopping as exc:
                metrics.http(metrics.errors, path, "503").inc()
                return _error(503, str(exc), "unavailable", headers={"Retry-After": "1"})
        try:
            response = await call_next(request)
        finally:
            if guarded and gate is not None:
                gate.leave()
        route = request.scope.get("route")
        method = getattr(route, "path", path)
        metrics.http(metrics.requests, method).inc()
        metrics.http(metrics.request_seconds, method).observe(time.perf_counter() - t0)
        if response.status_code >= 400:
            metrics.http(metrics.errors, method, str(response.status_code)).inc()
        return response

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> JSONResponse:
        return _error(404, str(exc), "not_found")

    @app.exception_handler(LimitExceeded)
    async def too_large(request: Request, exc: LimitExceeded) -> JSONResponse:
        return _error(413, str(exc), "limit_exceeded")

    @app.exception_handler(InvalidInput)
    async def invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in %s", request.url.path, exc_info=exc)
        return _error(500, "internal error (logged on the server)", "internal")

    def result_out(result: SearchResult) -> SearchOut:
        hits = []
        for h in result.hits:
            f = hit_fields(h)
            thumb = f"/v1/thumbnails/{h.id}" if f["payload"].get("image_path") else None
            hits.append(HitOut(**f, thumbnail=thumb))
        return SearchOut(hits=hits, target=result.target, collection=backend.collection, latency_ms=result.latency_ms)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok", "uptime_s": round(time.time() - started, 1)}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> JSONResponse:
        """Readiness: the server is not stopping, and the collection is open and holds points."""
        if not ready():
            return JSONResponse({"status": "not ready", "reason": "draining: the server is stopping"}, status_code=503)
        try:
            points = backend.info()["points"]
        except Exception as exc:  # not ready is an answer, not an error
            return JSONResponse({"status": "not ready", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", "collection": backend.collection, "points": points})

    @app.get("/metrics", tags=["operations"])
    def prometheus() -> Response:
        """Prometheus metrics of both protocols."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", tags=["search"])
    def info() -> dict[str, Any]:
        """The collection, bundle, points per kind and limits."""
        return backend.info()

    @app.post("/v1/search", tags=["search"])
    def search(body: SearchBody) -> SearchOut:
        """One search by text, image (base64), vector or point id."""
        image = _decode_b64(body.image_base64, "image_base64") if body.image_base64 is not None else None
        vector = np.asarray(body.vector, np.float32) if body.vector is not None else None
        query = SearchQuery(body.text, image, vector, body.point_id, body.target, body.limit, dict(body.filters))
        return result_out(backend.search(query))

    @app.post(
        "/v1/search/image",
        tags=["search"],
        openapi_extra={"requestBody": {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def search_image(
        request: Request,
        target: Literal["image", "text", "unit"] = Query("text"),
        limit: int = Query(10),
    ) -> SearchOut:
        """One search by an uploaded image: the request body is the image file itself."""
        declared = int(request.headers.get("content-length") or 0)
        if declared > backend.limits.max_image_bytes:
            raise LimitExceeded(
                f"image upload has {declared} bytes, over the limit max_image_bytes={backend.limits.max_image_bytes}"
            )
        data = await request.body()
        if not data:
            raise InvalidInput("the request body must be an image file")
        query = SearchQuery(image=data, target=target, limit=limit)
        return result_out(await _run(backend.search, query))

    @app.get("/v1/thumbnails/{point_id}", tags=["search"], response_class=Response)
    def thumbnail(point_id: str) -> Response:
        """A bounded JPEG of an indexed point's image (only images of the collection are ever served)."""
        return Response(backend.thumbnail(point_id), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/embeddings", tags=["embeddings"])
    def embeddings(body: EmbeddingsBody) -> dict[str, Any]:
        """Embeddings in the OpenAI shape; `input` items `{"image": "<base64>"}` embed images (an extension)."""
        if body.model is not None and body.model != backend.encoder.bundle_version:
            raise InvalidInput(f"model {body.model!r} is not served here (this is {backend.encoder.bundle_version})")
        items: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        if items and all(isinstance(i, dict) for i in items):
            images = [_decode_b64(i.get("image", ""), f"input[{n}].image") for n, i in enumerate(items)]
            vectors, tokens = backend.embed(images=images)
        elif all(isinstance(i, str) for i in items):
            vectors, tokens = backend.embed(texts=items)
        else:
            raise InvalidInput("input items must be all strings or all {'image': base64} objects")
        data = []
        for n, v in enumerate(vectors):
            emb: Any = (
                base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            )
            data.append({"object": "embedding", "index": n, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": backend.encoder.bundle_version,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    return app


async def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs blocking work (encoding, the store) in the thread pool, off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
