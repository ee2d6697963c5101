"""Inference: sampling, generation with a KV cache, and (later) the batched serving engine."""
