"""gRPC servicer of `imgtxt.v1.ImageEncoder`: reads the images of a request; the rest is shared."""

from __future__ import annotations

from imgtxt.serving.servicer import EncoderServicerBase
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc


class ImageEncoderServicer(EncoderServicerBase[bytes], pb_grpc.ImageEncoderServicer):
    """Encode / EncodeStream / Info for images (encoded file bytes)."""

    def _items(self, request: pb.EncodeImagesRequest) -> list[bytes]:
        return [item.data for item in request.items]
