"""The search service over gRPC and HTTP: the same hits as the library call, limits, thumbnails, embeddings, auth."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from imgtxt.wire import pack_embeddings
from search_service.server import SearchServer


def _http(
    server: SearchServer,
    path: str,
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
) -> tuple[int, bytes, dict[str, str]]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data)
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def _stub(server: SearchServer) -> pb_grpc.SearchServiceStub:
    return pb_grpc.SearchServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


def test_text_search_is_the_same_over_grpc_http_and_the_library(search_server: SearchServer) -> None:
    query = "photo 5 shows thing 1 in colour 2"
    library = search_server.backend.searcher.search_text(query, target="image", limit=5)
    grpc_hits = _stub(search_server).Search(pb.SearchRequest(text=query, limit=5), timeout=30).hits
    status, body, _ = _http(search_server, "/v1/search", {"text": query, "limit": 5})
    assert status == 200
    http_hits = json.loads(body)["hits"]
    assert [h.id for h in library] == [h.id for h in grpc_hits] == [h["id"] for h in http_hits]
    assert len(library) == 5 and all(h.kind == "image" for h in grpc_hits)
    assert [h.score for h in grpc_hits] == sorted((h.score for h in grpc_hits), reverse=True)
    assert grpc_hits[0].score == pytest.approx(library[0].score, abs=1e-6)
    assert http_hits[0]["thumbnail"] == f"/v1/thumbnails/{http_hits[0]['id']}"
    assert json.loads(grpc_hits[0].payload_json)["kind"] == "image"


def test_image_vector_and_point_queries(search_server: SearchServer, index: tuple[Path, Path]) -> None:
    image = (index[0] / "images" / "img0003.jpg").read_bytes()
    stub = _stub(search_server)
    by_image = stub.Search(pb.SearchRequest(image=image, limit=4), timeout=30)
    assert [h.kind for h in by_image.hits] == ["text"] * 4 and by_image.hits[0].caption
    assert by_image.latency_ms > 0 and by_image.collection == "search-test"
    units = stub.Search(pb.SearchRequest(image=image, target="unit", limit=3), timeout=30).hits
    assert all(h.kind == "unit" and h.caption and h.image_key for h in units)
    vector = search_server.backend.encoder.encode_images([image]).embeddings[0]
    by_vector = stub.Search(
        pb.SearchRequest(
            vector=pb.QueryVector(data=pack_embeddings(vector[None]), dim=len(vector)), target="text", limit=4
        ),
        timeout=30,
    )
    assert [h.id for h in by_vector.hits] == [h.id for h in by_image.hits]
    # "More like this" on the image's own point: the image is its own nearest image.
    own = stub.Search(pb.SearchRequest(image=image, target="image", limit=1), timeout=30).hits[0]
    more = stub.Search(pb.SearchRequest(point_id=own.id, limit=3), timeout=30).hits
    assert more[0].id == own.id and more[0].score == pytest.approx(1.0, abs=1e-4)
    assert stub.Search(pb.SearchRequest(text="photo 1", filters={"split": "val"}, limit=2), timeout=30).hits


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (pb.SearchRequest(limit=3), grpc.StatusCode.INVALID_ARGUMENT, "exactly one of text, image"),
        (pb.SearchRequest(text="a dog", limit=500), grpc.StatusCode.INVALID_ARGUMENT, r"limit must be in 1\.\.20"),
        (pb.SearchRequest(text="x" * 300), grpc.StatusCode.RESOURCE_EXHAUSTED, "max_text_chars=200"),
        (pb.SearchRequest(text="a dog", target="video"), grpc.StatusCode.INVALID_ARGUMENT, "target must be one of"),
        (pb.SearchRequest(image=b"not an image"), grpc.StatusCode.INVALID_ARGUMENT, "image query rejected"),
        (pb.SearchRequest(point_id="no-such-point"), grpc.StatusCode.INVALID_ARGUMENT, "not in collection"),
        (
            pb.SearchRequest(vector=pb.QueryVector(data=b"\0" * 12, dim=3)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "dimension 32",
        ),
    ],
)
def test_bad_queries_get_clear_errors_and_the_service_keeps_serving(
    search_server: SearchServer, request_: pb.SearchRequest, code: grpc.StatusCode, message: str
) -> None:
    stub = _stub(search_server)
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(request_, timeout=30)
    assert err.value.code() == code
    assert pytest.importorskip("re").search(message, err.value.details())
    assert stub.Search(pb.SearchRequest(text="photo 2", limit=1), timeout=30).hits  # still serving


def test_info_reports_collection_points_and_limits(search_server: SearchServer) -> None:
    info = _stub(search_server).Info(pb.SearchInfoRequest(), timeout=30)
    assert info.collection == "search-test" and info.dim == 32 and info.max_limit == 20
    assert dict(info.points) == {"image": 12, "text": 24, "unit": 24}
    status, body, _ = _http(search_server, "/v1/info")
    assert status == 200 and json.loads(body)["points"] == {"image": 12, "text": 24, "unit": 24}


def test_http_upload_health_metrics_and_openapi(search_server: SearchServer, index: tuple[Path, Path]) -> None:
    image = (index[0] / "images" / "img0003.jpg").read_bytes()
    status, body, _ = _http(search_server, "/v1/search/image?target=text&limit=4", raw=image, content_type="image/jpeg")
    assert status == 200
    grpc_ids = [h.id for h in _stub(search_server).Search(pb.SearchRequest(image=image, limit=4), timeout=30).hits]
    assert [h["id"] for h in json.loads(body)["hits"]] == grpc_ids
    b64 = {"image_base64": base64.b64encode(image).decode(), "target": "text", "limit": 4}
    assert [h["id"] for h in json.loads(_http(search_server, "/v1/search", b64)[1])["hits"]] == grpc_ids
    assert _http(search_server, "/v1/search", {"image_base64": "%%%"})[0] == 400
    assert _http(search_server, "/healthz")[0] == 200
    status, body, _ = _http(search_server, "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, body, _ = _http(search_server, "/metrics")
    assert status == 200 and b'imgtxt_search_requests_total{method="/v1/search",protocol="http"}' in body
    assert b'imgtxt_search_requests_total{method="Search",protocol="grpc"}' in body
    spec = json.loads(_http(search_server, "/openapi.json")[1])
    assert {"/v1/search", "/v1/search/image", "/v1/embeddings", "/v1/thumbnails/{point_id}"} <= set(spec["paths"])
    status, body, _ = _http(search_server, "/")
    assert status == 200 and b"<title>imgtxt search</title>" in body


def test_thumbnails_only_for_indexed_items_and_bounded(search_server: SearchServer) -> None:
    hit = _stub(search_server).Search(pb.SearchRequest(text="photo 4", limit=1), timeout=30).hits[0]
    status, body, headers = _http(search_server, f"/v1/thumbnails/{hit.id}")
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(body)).size) <= 256
    caption = _stub(search_server).Search(pb.SearchRequest(text="photo 4", target="text", limit=1), timeout=30).hits[0]
    assert _http(search_server, f"/v1/thumbnails/{caption.id}")[0] == 404  # a caption has no image
    for probe in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "../../pyproject.toml", "no-such-point"):
        status, body, _ = _http(search_server, f"/v1/thumbnails/{probe}")
        assert status == 404 and b"root:" not in body
    for probe in ("/static/../pyproject.toml", "/static/..%2F..%2Fpyproject.toml", "/static/%2e%2e/web.py"):
        status, body, _ = _http(search_server, probe)
        assert status == 404 and b"[project]" not in body and b"def create_app" not in body


def test_embeddings_route_in_the_openai_shape(search_server: SearchServer, index: tuple[Path, Path]) -> None:
    texts = ["a dog runs", "two children in the water"]
    status, body, _ = _http(search_server, "/v1/embeddings", {"input": texts, "model": None})
    assert status == 200
    out = json.loads(body)
    assert out["object"] == "list" and out["model"] == search_server.backend.encoder.bundle_version
    assert [d["index"] for d in out["data"]] == [0, 1] and out["data"][0]["object"] == "embedding"
    expected = search_server.backend.encoder.encode_texts(texts).embeddings
    np.testing.assert_allclose(np.array([d["embedding"] for d in out["data"]]), expected, atol=1e-6)
    assert out["usage"]["prompt_tokens"] > 0
    packed = json.loads(_http(search_server, "/v1/embeddings", {"input": "a dog runs", "encoding_format": "base64"})[1])
    vec = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, expected[0], atol=1e-6)
    image = base64.b64encode((index[0] / "images" / "img0001.jpg").read_bytes()).decode()
    images = json.loads(_http(search_server, "/v1/embeddings", {"input": [{"image": image}]})[1])
    assert len(images["data"][0]["embedding"]) == 32
    status, body, _ = _http(search_server, "/v1/embeddings", {"input": ["ok", ""]})
    assert status == 400 and "input[1]" in json.loads(body)["error"]["message"]
    assert _http(search_server, "/v1/embeddings", {"input": "x", "model": "other-bundle"})[0] == 400
