"""`llmctl quantize`: int8 / int4 weight-only quantization, pruning, GGUF and ONNX export."""

from llmctl.commands.placeholder import placeholder_app

app = placeholder_app("quantize", "int8 / int4 weight-only quantization, pruning, GGUF and ONNX export")
