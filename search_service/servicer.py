"""gRPC servicer of `imgtxt.v1.SearchService`: protocol in -> `SearchBackend` -> protocol out."""

from __future__ import annotations

import grpc
import numpy as np

from imgtxt.v1 import search_pb2 as pb
from imgtxt.v1 import search_pb2_grpc as pb_grpc
from imgtxt.wire import unpack_embeddings
from search.backend import Query, SearchBackend, hit_fields, payload_json


def query_from_request(request: pb.SearchRequest) -> Query:
    """The domain query of a request (the oneof says which field is the query)."""
    which = request.WhichOneof("query")
    vector = None
    if which == "vector":
        vector = (
            unpack_embeddings(request.vector.data, request.vector.dim)[0] if request.vector.dim > 0 else np.zeros(0)
        )
    return Query(
        text=request.text if which == "text" else None,
        image=request.image if which == "image" else None,
        vector=vector,
        point_id=request.point_id if which == "point_id" else None,
        target=request.target or None,
        limit=request.limit or 10,
        filters=dict(request.filters),
    )


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Search and Info; errors are raised as domain exceptions and mapped by the error interceptor."""

    def __init__(self, backend: SearchBackend) -> None:
        self.backend = backend

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> pb.SearchResponse:
        """One query against one kind of points."""
        result = self.backend.search(query_from_request(request))
        hits = []
        for h in result.hits:
            f = hit_fields(h)
            hits.append(
                pb.SearchHit(
                    id=f["id"],
                    score=f["score"],
                    kind=f["kind"],
                    key=f["key"],
                    image_key=f["image_key"],
                    caption=f["caption"],
                    payload_json=payload_json(f["payload"]),
                )
            )
        return pb.SearchResponse(hits=hits, collection=self.backend.collection, latency_ms=result.latency_ms)

    def Info(self, request: pb.SearchInfoRequest, context: grpc.ServicerContext) -> pb.SearchInfoResponse:
        """The collection, bundle and limits."""
        return pb.SearchInfoResponse(**self.backend.info())
