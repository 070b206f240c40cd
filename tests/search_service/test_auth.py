"""One bearer token guards both protocols of the search service (the page and the probes stay open); TLS on both."""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from search_service.server import SearchServer
from tests.search_service.conftest import TOKEN
from tests.search_service.test_protocol import _grpc_error
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


def test_tls_on_both_ports(secured_search_server: SearchServer, tmp_path: Path) -> None:
    from search_service.server import SearchServerConfig, create_search_server
    from tests.services.conftest import self_signed_cert

    cert, key = self_signed_cert(tmp_path, "search")
    config = SearchServerConfig(port=0, http_port=0, tls_cert=cert, tls_key=key)
    # The same backend (one process may open an embedded store once) behind a second, TLS-only server.
    server = create_search_server(config, secured_search_server.backend)
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"https://127.0.0.1:{server.http_port}/healthz", context=context, timeout=30) as r:
            assert r.status == 200
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):  # plain HTTP: refused
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/healthz", timeout=10)
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{server.port}", creds) as channel:
            hits = pb_grpc.SearchServiceStub(channel).Search(pb.SearchRequest(text="photo 1", limit=2), timeout=30)
        assert len(hits.hits) == 2
    finally:
        server.stop(grace=0)


def test_a_malformed_request_without_a_token_is_refused_for_the_token_first(
    secured_search_server: SearchServer,
) -> None:
    server = secured_search_server
    # Before: INVALID_ARGUMENT (and what was wrong with the request) to a caller without the token.
    err = _grpc_error(server, pb.SearchRequest(vector=pb.QueryVector(data=b"", dim=32)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    auth = (("authorization", f"Bearer {TOKEN}"),)
    err = _grpc_error(server, pb.SearchRequest(vector=pb.QueryVector(data=b"", dim=32)), metadata=auth)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, pytest.raises(grpc.RpcError) as raw:
        channel.unary_unary("/imgtxt.v1.SearchService/Search")(b"\x0a\x05ab", timeout=30)  # unparsable
    assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for body in ({"text": "a dog", "limit": "many"}, {"vector": []}):
        assert _http(server, "/v1/search", body)[0] == 401
        assert _http(server, "/v1/search", body, token=TOKEN)[0] in (400, 422)
