"""The vector-store layer: stores, point ids and kinds, the store, collection and search flags, collection identity."""
