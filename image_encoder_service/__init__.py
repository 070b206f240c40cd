"""gRPC image encoder service: serves the image tower of a model bundle with ONNX Runtime."""
