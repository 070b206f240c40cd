"""HTTP/JSON front door of the search service (FastAPI, described by OpenAPI at `/openapi.json`), and the web page.

Routes: `POST /v1/search` (JSON query), `POST /v1/search/image` (raw image bytes), `GET /v1/thumbnails/{point_id}`,
`POST /v1/embeddings` (the OpenAI request/response shape; images as a documented extension), `GET /v1/info`,
`GET /healthz` (liveness), `GET /readyz` (readiness), `GET /metrics` (Prometheus), and the page at `/`.
With a token, every route but health, readiness and the page's static files needs `Authorization: Bearer <token>`,
checked first by the server shell's checker (the gRPC side's). Requests pass the shell's admission gate (503 once a
stop refuses new calls); every error has the one body of `models.ErrorOut`. Bodies convert in `converters`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from imgtxt.errors import InvalidInput, LimitExceeded, WrongSpace
from imgtxt.serving.auth import TokenChecker
from imgtxt.serving.interceptors import AdmissionGate, ServerStopping
from search.backend import NotFound, SearchBackend
from search.backend import Query as SearchQuery
from search_service.converters import (
    SearchInfo,
    embed_inputs_from_http,
    embeddings_to_http,
    query_from_http,
    result_to_http,
    search_info,
)
from search_service.models import EmbeddingsBody, ErrorDetail, ErrorOut, SearchBody, SearchOut
from search_service.prometheus import SearchMetrics

logger = logging.getLogger(__name__)

STATIC = resources.files("search_service") / "static"
OPEN_PATHS = ("/healthz", "/readyz", "/static/", "/favicon.ico")


def _error(
    status: int, message: str, kind: str, headers: dict[str, str] | None = None, param: str | None = None
) -> JSONResponse:
    """The one error body (`models.ErrorOut`) of every HTTP error."""
    body = ErrorOut(error=ErrorDetail(message=message, type=kind, param=param))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """FastAPI's validation errors as one message naming each field, and the first field."""
    parts, first = [], None
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        name = ".".join(loc) or "body"
        first = first or name
        parts.append(f"{name}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is not valid", first


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

    @app.exception_handler(WrongSpace)
    async def wrong_space(request: Request, exc: WrongSpace) -> JSONResponse:
        return _error(409, str(exc), "wrong_space")

    @app.exception_handler(InvalidInput)
    async def invalid(request: Request, exc: InvalidInput) -> JSONResponse:
        return _error(400, str(exc), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def unprocessable(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(422, message, "invalid_request_error", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind, headers=dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error in %s", request.url.path, exc_info=exc)
        return _error(500, "internal error (logged on the server)", "internal")

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
            points = search_info(backend).points
        except Exception as exc:  # not ready is an answer, not an error
            return JSONResponse({"status": "not ready", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready", "collection": backend.collection, "points": points})

    @app.get("/metrics", tags=["operations"])
    def prometheus() -> Response:
        """Prometheus metrics of both protocols."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/info", tags=["search"])
    def info() -> SearchInfo:
        """The collection, bundle, points per kind and limits."""
        return search_info(backend)

    @app.post("/v1/search", tags=["search"])
    def search(body: SearchBody) -> SearchOut:
        """One search by text, image (base64), vector or point id."""
        return result_to_http(backend.search(query_from_http(body)))

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
        return result_to_http(await _run(backend.search, query))

    @app.get("/v1/thumbnails/{point_id}", tags=["search"], response_class=Response)
    def thumbnail(point_id: str) -> Response:
        """A bounded JPEG of an indexed point's image (only images of the collection are ever served)."""
        return Response(backend.thumbnail(point_id), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/embeddings", tags=["embeddings"])
    def embeddings(body: EmbeddingsBody) -> dict[str, Any]:
        """Embeddings in the OpenAI shape; `input` items `{"image": "<base64>"}` embed images (an extension)."""
        inputs = embed_inputs_from_http(body, backend.encoder.bundle_version, backend.encoder.dim)
        vectors, tokens = backend.embed(texts=inputs.texts, images=inputs.images)
        return embeddings_to_http(vectors, tokens, backend.encoder.bundle_version, body.encoding_format)

    return app


async def _run(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs blocking work (encoding, the store) in the thread pool, off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
