from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageItem(_message.Message):
    __slots__ = ("id", "data")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class TextItem(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class EncodeImagesRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ImageItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ImageItem, _Mapping]]] = ...) -> None: ...

class EncodeTextsRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[TextItem]
    def __init__(self, items: _Optional[_Iterable[_Union[TextItem, _Mapping]]] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("id", "code", "message", "truncated", "num_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: str
    code: int
    message: str
    truncated: bool
    num_tokens: int
    def __init__(self, id: _Optional[str] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., truncated: _Optional[bool] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("dim", "embeddings", "results", "bundle_version")
    DIM_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    dim: int
    embeddings: bytes
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    bundle_version: str
    def __init__(self, dim: _Optional[int] = ..., embeddings: _Optional[bytes] = ..., results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., bundle_version: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_batch", "max_message_bytes", "max_image_bytes", "max_image_pixels", "max_tokens", "max_text_chars")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_message_bytes: int
    max_image_bytes: int
    max_image_pixels: int
    max_tokens: int
    max_text_chars: int
    def __init__(self, max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_tokens: _Optional[int] = ..., max_text_chars: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("modality", "bundle_version", "bundle_sha256", "dim", "normalized", "distance", "execution_provider", "providers", "limits", "precision", "quantization", "unit_head", "batching", "batch_workers", "intra_op_threads", "batching_reason", "precision_reason")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    DISTANCE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    UNIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    BATCH_WORKERS_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_REASON_FIELD_NUMBER: _ClassVar[int]
    PRECISION_REASON_FIELD_NUMBER: _ClassVar[int]
    modality: str
    bundle_version: str
    bundle_sha256: str
    dim: int
    normalized: bool
    distance: str
    execution_provider: str
    providers: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    precision: str
    quantization: str
    unit_head: str
    batching: str
    batch_workers: int
    intra_op_threads: int
    batching_reason: str
    precision_reason: str
    def __init__(self, modality: _Optional[str] = ..., bundle_version: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., dim: _Optional[int] = ..., normalized: _Optional[bool] = ..., distance: _Optional[str] = ..., execution_provider: _Optional[str] = ..., providers: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., precision: _Optional[str] = ..., quantization: _Optional[str] = ..., unit_head: _Optional[str] = ..., batching: _Optional[str] = ..., batch_workers: _Optional[int] = ..., intra_op_threads: _Optional[int] = ..., batching_reason: _Optional[str] = ..., precision_reason: _Optional[str] = ...) -> None: ...
