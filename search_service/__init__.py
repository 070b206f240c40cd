"""The search service: gRPC `imgtxt.v1.SearchService` and HTTP/JSON (with a web page) over one `SearchBackend`."""
