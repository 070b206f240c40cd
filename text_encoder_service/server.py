"""Builds the text encoder gRPC server (shared wiring in `imgtxt.serving.server`)."""

from __future__ import annotations

from imgtxt.encoders.text import TextEncoder
from imgtxt.serving.config import ServerConfig
from imgtxt.serving.server import EncoderServer, build_server
from imgtxt.v1 import encoder_pb2 as pb
from imgtxt.v1 import encoder_pb2_grpc as pb_grpc
from text_encoder_service.servicer import TextEncoderServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextEncoder"].full_name


def create_server(config: ServerConfig, encoder: TextEncoder) -> EncoderServer:
    """Builds, registers, binds and starts the server without blocking; NOT_SERVING until `warm_up()`."""
    return build_server(config, encoder, TextEncoderServicer, pb_grpc.add_TextEncoderServicer_to_server, SERVICE_NAME)
