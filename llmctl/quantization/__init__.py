"""Quantized weights as the model runs them: int8 and int4 layers (`qlinear`) and turning a model's layers
into them and back (`quantize`). Below the checkpoint format, which builds a quantized checkpoint's layers
with them; `compress/` is the engine that produces and measures quantized checkpoints."""
