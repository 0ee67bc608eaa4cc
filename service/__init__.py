"""seqserve serving side: gRPC API, batching engine, onnxruntime runtime. Never imports torch."""

__version__ = "0.1.0"
