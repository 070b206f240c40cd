"""The HTTP/JSON schemas of the search service (pydantic; they are what `/openapi.json` describes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class SearchBody(BaseModel):
    """A search: exactly one of `text`, `image_base64`, `vector`, `point_id`."""

    text: str | None = Field(None, description="text query")
    image_base64: str | None = Field(None, description="encoded image file, base64")
    vector: list[float] | None = Field(None, description="a vector of the collection's space (finite values)")
    point_id: str | None = Field(None, description="'more like this': an indexed point's id")
    target: Literal["image", "text", "unit"] | None = Field(None, description="kind of points to search")
    limit: int = Field(10, description="most hits")
    filters: dict[str, str | int | bool] = Field(
        default_factory=dict,
        description="payload equality filters; a string that reads as a JSON integer or boolean matches as one "
        "(the rule of the CLI's --filter and of gRPC's filters)",
    )


class HitOut(BaseModel):
    """One hit."""

    id: str
    score: float
    kind: str
    key: str
    image_key: str
    caption: str
    thumbnail: str | None = Field(None, description="URL of the hit's thumbnail, when it shows an image")
    payload: dict[str, Any]


class SearchOut(BaseModel):
    """Hits, best first."""

    hits: list[HitOut]
    target: str
    collection: str
    latency_ms: float


class EmbeddingsBody(BaseModel):
    """OpenAI `POST /v1/embeddings` request. Extension: `input` items may be `{"image": "<base64 image file>"}`."""

    input: str | list[str] | list[dict[str, str]]
    model: str | None = Field(None, description="ignored unless set: must name the served bundle version")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        None, description="must equal the served dimension when given (embeddings are not truncated: 400 otherwise)"
    )


class ErrorDetail(BaseModel):
    """What went wrong."""

    message: str = Field(description="what was wrong, naming the field and the limit")
    type: str = Field(
        description="invalid_request_error, auth, not_found, wrong_space, limit_exceeded, unavailable, internal"
    )
    param: str | None = Field(None, description="the request field at fault, when one is")


class ErrorOut(BaseModel):
    """The one body of every HTTP error (4xx and 5xx, request validation included)."""

    error: ErrorDetail
