"""The from-scratch Llama-style transformer: config, layers, KV caches, the fused LM-head loss and the Hugging
Face file layout.

Imports nothing else from llmctl (only torch, safetensors and annotated-types), so adapters, quantizers and
other tools can build on it without pulling in the rest.
"""

from llmctl.model.config import ModelConfig
from llmctl.model.kv_cache import KVCache
from llmctl.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
