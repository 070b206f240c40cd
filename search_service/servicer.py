"""gRPC servicer of `imgtxt.v1.SearchService`: protocol in -> `SearchBackend` -> protocol out (`converters`)."""

from __future__ import annotations

import grpc

from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from search.backend import SearchBackend
from search_service.converters import info_to_grpc, query_from_grpc, result_to_grpc, search_info


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Search and Info; errors are raised as domain exceptions and mapped by the error interceptor."""

    def __init__(self, backend: SearchBackend) -> None:
        self.backend = backend

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        """One query against one kind of points."""
        return result_to_grpc(self.backend.search(query_from_grpc(request)))

    def Info(self, request: pb.SearchInfoRequest, context: grpc.ServicerContext) -> pb.SearchInfoResponse:
        """The collection, bundle and limits."""
        return info_to_grpc(search_info(self.backend))
