"""One protocol mapping for gRPC and HTTP: vectors checked in the converter, one filter-value rule, one error body,
`dimensions` refused, Info from one dataclass (authentication before the request is judged: `test_auth`)."""

from __future__ import annotations

import dataclasses
import json

import grpc
import numpy as np
import pytest

from imgtxt.v1 import search_pb2 as pb
from imgtxt.wire import pack_embeddings
from search_service.converters import SearchInfo, filters_from, query_from_grpc, query_from_http
from search_service.models import SearchBody
from search_service.server import SearchServer
from tests.search_service.test_service import _http, _stub


def _grpc_error(server: SearchServer, request: pb.SearchRequest, **kw: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _stub(server).Search(request, timeout=30, **kw)
    return err.value


def test_an_empty_or_nan_vector_is_invalid_argument_naming_the_field(search_server: SearchServer) -> None:
    # Before: data=b"" answered INTERNAL (an IndexError); NaN answered OK / 200 with no hits.
    err = _grpc_error(search_server, pb.SearchRequest(vector=pb.QueryVector(data=b"", dim=32)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "vector.data is empty" in (err.details() or "")
    nan = np.full((1, 32), np.nan, np.float32)
    err = _grpc_error(search_server, pb.SearchRequest(vector=pb.QueryVector(data=pack_embeddings(nan), dim=32)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "vector.data must hold finite values" in err.details()
    err = _grpc_error(search_server, pb.SearchRequest(vector=pb.QueryVector(data=b"\0" * 8, dim=32)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 128" in err.details()
    for vector, message in (([], "vector is empty"), ([float("nan")] * 32, "vector must hold finite values")):
        status, body, _ = _http(search_server, "/v1/search", {"vector": vector})
        assert status == 400 and message in json.loads(body)["error"]["message"]


def test_filters_match_integer_payload_fields_over_both_protocols(search_server: SearchServer) -> None:
    # Before: caption_index="1" matched nothing over gRPC (a string against an integer) and 3 hits over HTTP.
    request = pb.SearchRequest(text="photo 3", target="text", limit=3, filters={"caption_index": "1"})
    grpc_hits = _stub(search_server).Search(request, timeout=30).hits
    status, body, _ = _http(
        search_server, "/v1/search", {"text": "photo 3", "target": "text", "limit": 3, "filters": {"caption_index": 1}}
    )
    assert status == 200
    http_hits = json.loads(body)["hits"]
    assert len(grpc_hits) == 3 and [h.id for h in grpc_hits] == [h["id"] for h in http_hits]
    assert all(json.loads(h.payload_json)["caption_index"] == 1 for h in grpc_hits)
    # The string form over HTTP follows the same rule.
    as_string = {"text": "photo 3", "target": "text", "limit": 3, "filters": {"caption_index": "1"}}
    assert [h["id"] for h in json.loads(_http(search_server, "/v1/search", as_string)[1])["hits"]] == [
        h.id for h in grpc_hits
    ]


def test_both_protocols_build_the_same_query_by_keyword() -> None:
    vector = np.arange(4, dtype=np.float32)
    grpc_query = query_from_grpc(
        pb.SearchRequest(
            vector=pb.QueryVector(data=pack_embeddings(vector[None]), dim=4),
            target="text",
            limit=3,
            filters={"split": "val", "caption_index": "2", "flag": "true"},
        )
    )
    http_query = query_from_http(
        SearchBody(vector=vector.tolist(), target="text", limit=3, filters={"split": "val", "caption_index": 2})
    )
    assert grpc_query.filters == {"split": "val", "caption_index": 2, "flag": True}
    assert http_query.filters == {"split": "val", "caption_index": 2}
    np.testing.assert_array_equal(grpc_query.vector, http_query.vector)  # type: ignore[arg-type]
    assert (grpc_query.target, grpc_query.limit, grpc_query.text) == (http_query.target, http_query.limit, None)
    with pytest.raises(ValueError, match="filters key 'a=b'"):
        filters_from({"a=b": "c"})


def test_every_http_error_has_the_one_body_shape(search_server: SearchServer) -> None:
    # Before: FastAPI's 422 answered {"detail": [...]}, unlike every other error's {"error": {...}}.
    for path, body, status, field in (
        ("/v1/search", {"text": "a dog", "limit": "many"}, 422, "limit"),
        ("/v1/search", {"text": "a dog", "target": "video"}, 422, "target"),
        ("/v1/embeddings", {"model": "x"}, 422, "input"),
        ("/v1/no-such-route", None, 404, None),
        ("/v1/search", {}, 400, None),
    ):
        got, raw, _ = _http(search_server, path, body)
        error = json.loads(raw)["error"]
        assert got == status and set(error) <= {"message", "type", "param"} and error["message"], (path, raw)
        if field is not None:
            assert error["param"] == field and error["message"].startswith(f"{field}:"), raw


def test_embeddings_refuse_dimensions_other_than_the_models(search_server: SearchServer) -> None:
    # Before: dimensions was silently ignored (32-dimensional embeddings for dimensions=8).
    status, body, _ = _http(search_server, "/v1/embeddings", {"input": "a dog", "dimensions": 8})
    message = json.loads(body)["error"]["message"]
    assert status == 400 and "dimensions=8" in message and "32 dimensions" in message
    status, body, _ = _http(search_server, "/v1/embeddings", {"input": "a dog", "dimensions": 32})
    assert status == 200 and len(json.loads(body)["data"][0]["embedding"]) == 32


def test_info_is_one_dataclass_on_both_protocols(search_server: SearchServer) -> None:
    info = _stub(search_server).Info(pb.SearchInfoRequest(), timeout=30)
    status, body, _ = _http(search_server, "/v1/info")
    assert status == 200
    fields = {f.name for f in dataclasses.fields(SearchInfo)}
    assert set(json.loads(body)) == fields == {f.name for f in info.DESCRIPTOR.fields}
    assert json.loads(body)["dim"] == info.dim == 32
