"""gRPC servicer of `imgtxt.v1.TextEncoder`: reads the texts of a request; the rest is shared."""

from __future__ import annotations

from imgtxt.serving.servicer import EncoderServicerBase
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc


class TextEncoderServicer(EncoderServicerBase[str], pb_grpc.TextEncoderServicer):
    """Encode / EncodeStream / Info for texts."""

    def _items(self, request: pb.EncodeTextsRequest) -> list[str]:
        return [item.text for item in request.items]
