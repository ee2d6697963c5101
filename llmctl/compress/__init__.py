"""Making a trained model smaller and faster: weight-only quantization (int8, int4; round-to-nearest or GPTQ), pruning,
and export to the formats other runtimes read (GGUF, ONNX)."""
