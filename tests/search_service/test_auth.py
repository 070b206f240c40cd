"""One bearer token guards both protocols of the search service (the page and the probes stay open)."""

from __future__ import annotations

import grpc
import pytest

from imgtxt.v1 import search_pb2 as pb
from search_service.server import SearchServer
from tests.search_service.conftest import TOKEN
from tests.search_service.test_service import _http, _stub


def test_one_token_guards_both_protocols(secured_search_server: SearchServer) -> None:
    server = secured_search_server
    assert _http(server, "/v1/search", {"text": "photo 1"})[0] == 401
    assert _http(server, "/v1/search", {"text": "photo 1"}, token="wrong")[0] == 401
    assert _http(server, "/v1/search", {"text": "photo 1"}, token=TOKEN)[0] == 200
    assert _http(server, "/healthz")[0] == 200 and _http(server, "/")[0] == 200  # probes and the page itself
    assert _http(server, "/metrics")[0] == 401
    stub = _stub(server)
    with pytest.raises(grpc.RpcError) as err:
        stub.Search(pb.SearchRequest(text="photo 1"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    auth = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.Search(pb.SearchRequest(text="photo 1"), timeout=30, metadata=auth).hits
