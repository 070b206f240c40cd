"""Builds the image encoder gRPC server (shared wiring in `imgtxt.serving.server`)."""

from __future__ import annotations

from image_encoder_service.servicer import ImageEncoderServicer
from imgtxt.encoders.image import ImageEncoder
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.server import EncoderServer, build_server
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageEncoder"].full_name


def create_server(config: ServerConfig, encoder: ImageEncoder) -> EncoderServer:
    """Builds, registers, binds and starts the server without blocking; NOT_SERVING until `warm_up()`."""
    return build_server(config, encoder, ImageEncoderServicer, pb_grpc.add_ImageEncoderServicer_to_server, SERVICE_NAME)
