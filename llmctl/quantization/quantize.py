"""Weight-only quantization of a whole model: every projection (and optionally the LM head and the
embedding) swapped by name for its quantized layer, and the settings recorded as a `quantization_config`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from llmctl.model import Transformer
from llmctl.model.layers import RMSNorm
from llmctl.quantization.qlinear import Int4Linear, Int8Embedding, Int8Linear, keep_bias

QUANT_METHOD = "llmctl"  # the `quant_method` transformers reads; it has no integration for this one
GROUP_SIZES = (32, 64, 128)
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class QuantizationSettings:
    method: Literal["int8", "int4"]
    group_size: int = 64  # int4 only
    head: bool = True  # quantize the LM head too (with the method's format)
    embeddings: bool = True  # hold the embedding int8 per row
    algorithm: Literal["rtn", "gptq"] = "rtn"  # round-to-nearest, or GPTQ's calibrated rounding

    def __post_init__(self) -> None:
        if self.method not in ("int8", "int4"):
            raise ValueError(f"unknown quantization method {self.method!r}; use int8 or int4")
        if self.method == "int4" and self.group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, not {self.group_size}")

    def to_config(self) -> dict:
        """What config.json records under `quantization_config`."""
        return {
            "quant_method": QUANT_METHOD,
            "bits": 8 if self.method == "int8" else 4,
            "scheme": "int8 symmetric per output channel"
            if self.method == "int8"
            else "int4 asymmetric group-wise",
            **asdict(self),
        }

    @classmethod
    def from_config(cls, config: dict) -> QuantizationSettings:
        if config.get("quant_method") != QUANT_METHOD:
            raise ValueError(
                f"quantization_config.quant_method is {config.get('quant_method')!r}; llmctl opens only its "
                f"own ({QUANT_METHOD!r}) quantized checkpoints"
            )
        return cls(
            method=config["method"],
            group_size=config.get("group_size", 64),
            head=config.get("head", True),
            embeddings=config.get("embeddings", True),
            algorithm=config.get("algorithm", "rtn"),
        )


def block_linear_names(model: Transformer) -> list[str]:
    """Module names of every block projection, in forward order."""
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [
        f"model.layers.{index}.{'self_attn' if name in attention else 'mlp'}.{name}"
        for index in range(model.config.n_layer)
        for name in BLOCK_LINEARS
    ]


def quantized_linear_names(model: Transformer, settings: QuantizationSettings) -> list[str]:
    """Module names, in forward order, of the linears this setting quantizes."""
    head = ["lm_head"] if settings.head and not model.config.tie_embeddings else []
    return block_linear_names(model) + head


def quantize_embedding(model: Transformer, settings: QuantizationSettings) -> bool:
    """Whether the embedding is held int8. A tied embedding is the head's matrix as well: it is quantized
    (int8 per row, which is per output channel of the head, so one tensor serves both) only when both the
    head and the embedding are asked for."""
    if model.config.tie_embeddings:
        return settings.embeddings and settings.head
    return settings.embeddings


def _tie_quantized_head(model: Transformer) -> None:
    """The head of a tied model reads the int8 embedding's own buffers."""
    embedding = model.model.embed_tokens
    head = Int8Linear(embedding.embedding_dim, embedding.num_embeddings, device="meta")
    model.lm_head = head
    model.tie_weights()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _quantized_linear(linear: nn.Linear, settings: QuantizationSettings) -> nn.Linear:
    if settings.method == "int8":
        return Int8Linear.from_linear(linear)
    return Int4Linear.from_linear(linear, settings.group_size)


@torch.no_grad()
def quantize_model(
    model: Transformer, settings: QuantizationSettings, prepared: dict[str, nn.Module] | None = None
) -> Transformer:
    """Swap the model's layers for quantized ones in place: round-to-nearest, or the layers in `prepared`
    (by module name) that a calibrated method already solved."""
    prepared = prepared or {}
    for name in quantized_linear_names(model, settings):
        linear = model.get_submodule(name)
        layer = prepared.get(name) or _quantized_linear(linear, settings)
        _set_module(model, name, keep_bias(layer, linear))
    if quantize_embedding(model, settings):
        model.model.embed_tokens = Int8Embedding.from_embedding(model.model.embed_tokens)
        if model.config.tie_embeddings:
            _tie_quantized_head(model)
    return model


def empty_quantized_model(model: Transformer, settings: QuantizationSettings) -> Transformer:
    """The model with empty quantized layers in place, ready for `load_state_dict` of a quantized file."""
    for name in quantized_linear_names(model, settings):
        linear = model.get_submodule(name)
        if settings.method == "int8":
            layer: nn.Module = Int8Linear(linear.in_features, linear.out_features)
        else:
            layer = Int4Linear(linear.in_features, linear.out_features, settings.group_size)
        _set_module(model, name, keep_bias(layer, linear))
    if quantize_embedding(model, settings):
        embedding = model.model.embed_tokens
        model.model.embed_tokens = Int8Embedding(embedding.num_embeddings, embedding.embedding_dim)
        if model.config.tie_embeddings:
            _tie_quantized_head(model)
    return model


def dequantized_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Float weights under HF names (quantized layers dequantized): what a merge or an export starts from."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear, Int8Embedding)):
            state[f"{name}.weight"] = module.dequantize()
        elif isinstance(module, (nn.Linear, nn.Embedding, RMSNorm)):
            state[f"{name}.weight"] = module.weight.detach()
        if isinstance(module, nn.Linear) and module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach()
    return state


@torch.no_grad()
def dequantize_model(model: Transformer) -> Transformer:
    """Swap quantized layers back for float ones holding their dequantized weights, in place: a QLoRA adapter
    merges into these, and the result is a plain float checkpoint."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (Int8Linear, Int4Linear)):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.copy_(module.dequantize())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            _set_module(model, name, linear)
        elif isinstance(module, Int8Embedding):
            embedding = nn.Embedding(module.num_embeddings, module.embedding_dim)
            embedding.weight.copy_(module.dequantize())
            _set_module(model, name, embedding)
    model.tie_weights()
    return model
