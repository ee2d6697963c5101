"""Read and write the Hugging Face Llama directory layout (config.json + safetensors).

The weight names of `Transformer` are HF's, so conversion is only about the config and tied weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from llmctl.model.config import ModelConfig
from llmctl.model.transformer import Transformer, meta_without_init

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def to_hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers 4.x reads rope_theta, 5.x rope_parameters: carry both so either opens it.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def from_hf_config(hf: dict) -> ModelConfig:
    """The llmctl shape of an HF Llama config; features the model lacks are refused, not ignored."""
    if hf.get("model_type") != "llama":
        raise ValueError(f"model_type is {hf.get('model_type')!r}; llmctl reads Llama checkpoints only")
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "rope_scaling": hf.get("rope_scaling"),
    }
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_parameters.rope_type"] = rope["rope_type"]
    if hf.get("hidden_act", "silu") != "silu":
        unsupported["hidden_act"] = hf["hidden_act"]
    present = {key: value for key, value in unsupported.items() if value}
    if present:
        raise ValueError(f"unsupported Llama features in config.json: {present}")
    d_model, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", d_model // n_head) != d_model // n_head:
        raise ValueError("config.json head_dim differs from hidden_size / num_attention_heads: unsupported")
    eos = hf.get("eos_token_id", 2)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head),
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
    )


def generation_config(config: ModelConfig) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "max_length": config.max_seq_len,
    }


HEAD = "lm_head."
EMBEDDING_MODULE = "model.embed_tokens."
EMBEDDING = EMBEDDING_MODULE + "weight"


def without_tied_head(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """A tied LM head is the embedding: files leave it out (and a quantized one's scales), as HF does."""
    return {name: t for name, t in state.items() if not (config.tie_embeddings and name.startswith(HEAD))}


def with_tied_head(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The full tensor set of a model read from a file that left a tied head out."""
    if config.tie_embeddings and EMBEDDING in state:
        tied = {
            HEAD + name.removeprefix(EMBEDDING_MODULE): t
            for name, t in state.items()
            if name.startswith(EMBEDDING_MODULE)
        }
        return {**state, **tied}
    return state


def export_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Contiguous tensors under HF names, ready for `write_model_files`."""
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    return without_tied_head(state, model.config)


def write_model_files(
    directory: Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    quantization_config: dict | None = None,
) -> None:
    """config.json (with transformers' `quantization_config` key for a quantized state), generation config
    and weights."""
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    hf_config = to_hf_config(config, dtype)
    if quantization_config is not None:
        hf_config["quantization_config"] = quantization_config
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(config), indent=2) + "\n")
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


def read_config(directory: Path) -> ModelConfig:
    return from_hf_config(json.loads((directory / CONFIG_FILE).read_text()))


def read_quantization_config(directory: Path) -> dict | None:
    return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("quantization_config")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Weights from a single `model.safetensors` or HF's sharded layout with an index."""
    single = directory / WEIGHTS_FILE
    if single.exists():
        return load_file(str(single))
    index = directory / WEIGHTS_INDEX_FILE
    if not index.exists():
        raise FileNotFoundError(f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(directory / shard)))
    return state


def load_model(
    directory: Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prepare: Callable[[Transformer], Transformer] | None = None,
) -> Transformer:
    """`prepare` swaps layers of the (still empty) model before the weights load: quantized ones, say."""
    config = read_config(directory)
    state = with_tied_head(read_state_dict(directory), config)
    with meta_without_init():
        model = Transformer(config)
        if prepare is not None:
            model = prepare(model)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives every parameter its own storage
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match config.json: missing {missing}, unexpected {unexpected}")
    model.init_rope()
    if dtype is not None:
        model.to(dtype)
    return model.eval()
