from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QueryVector(_message.Message):
    __slots__ = ("data", "dim")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dim: int
    def __init__(self, data: _Optional[bytes] = ..., dim: _Optional[int] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "image", "vector", "point_id", "target", "limit", "filters")
    class FiltersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    POINT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    vector: QueryVector
    point_id: str
    target: str
    limit: int
    filters: _containers.ScalarMap[str, str]
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., vector: _Optional[_Union[QueryVector, _Mapping]] = ..., point_id: _Optional[str] = ..., target: _Optional[str] = ..., limit: _Optional[int] = ..., filters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "kind", "key", "image_key", "caption", "payload_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_KEY_FIELD_NUMBER: _ClassVar[int]
    CAPTION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    kind: str
    key: str
    image_key: str
    caption: str
    payload_json: str
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., kind: _Optional[str] = ..., key: _Optional[str] = ..., image_key: _Optional[str] = ..., caption: _Optional[str] = ..., payload_json: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "collection", "latency_ms")
    HITS_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[SearchHit]
    collection: str
    latency_ms: float
    def __init__(self, hits: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., collection: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class SearchInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SearchInfoResponse(_message.Message):
    __slots__ = ("collection", "bundle_version", "dim", "points", "max_limit", "max_text_chars", "max_image_bytes")
    class PointsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LIMIT_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    collection: str
    bundle_version: str
    dim: int
    points: _containers.ScalarMap[str, int]
    max_limit: int
    max_text_chars: int
    max_image_bytes: int
    def __init__(self, collection: _Optional[str] = ..., bundle_version: _Optional[str] = ..., dim: _Optional[int] = ..., points: _Optional[_Mapping[str, int]] = ..., max_limit: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_image_bytes: _Optional[int] = ...) -> None: ...
