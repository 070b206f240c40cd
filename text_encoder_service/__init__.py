"""gRPC text encoder service: serves the text tower of a model bundle with ONNX Runtime."""
