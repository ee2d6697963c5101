"""The from-scratch Llama-style transformer. Imports nothing else from llmctl."""

from llmctl.model.config import ModelConfig
from llmctl.model.kv_cache import KVCache
from llmctl.model.transformer import Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
