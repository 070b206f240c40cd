"""Serving machinery shared by the two encoder services: ORT sessions, the tower encoder base, batching, gRPC wiring.

Submodules are imported explicitly (`from imgtxt.encoders.session import ...`): the domain side (`result`, `session`,
`tower`) imports no gRPC, so in-process users such as the indexer pay only for what they use.
"""
