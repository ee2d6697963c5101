"""Read and write the Hugging Face directory layout (config.json + safetensors) of the Llama family: Llama,
Mistral, Qwen2 and Qwen3, one model with options (biases, q/k norms, head width, RoPE scaling).

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


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_KEYS = {  # ModelConfig field -> the rope_parameters key transformers writes
    "rope_factor": "factor",
    "rope_original_max_seq_len": "original_max_position_embeddings",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_beta_fast": "beta_fast",
    "rope_beta_slow": "beta_slow",
    "rope_attention_factor": "attention_factor",
}
ROPE_KEYS_OF = {
    None: (),
    "linear": ("rope_factor",),
    "llama3": ("rope_factor", "rope_original_max_seq_len", "rope_low_freq_factor", "rope_high_freq_factor"),
    "yarn": (
        "rope_factor",
        "rope_original_max_seq_len",
        "rope_beta_fast",
        "rope_beta_slow",
        "rope_attention_factor",
    ),
}


def _rope_parameters(config: ModelConfig) -> dict:
    values = {ROPE_KEYS[name]: getattr(config, name) for name in ROPE_KEYS_OF[config.rope_scaling]}
    return {"rope_type": config.rope_scaling, **{k: v for k, v in values.items() if v is not None}}


def to_hf_config(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json as transformers writes it for the config's family, readable by transformers 4.x
    (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`) alike."""
    scaling = _rope_parameters(config) if config.rope_scaling else None
    hf = {
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": config.rope_theta, **(scaling or {"rope_type": "default"})},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if config.family in ("llama", "qwen3"):
        hf["attention_bias"] = config.attention_bias
    if config.family == "llama":
        hf["mlp_bias"] = False
    if config.family == "mistral":
        hf["sliding_window"] = None
    if config.family in ("qwen2", "qwen3"):
        hf |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    return hf


def from_hf_config(hf: dict, generation: dict | None = None) -> ModelConfig:
    """The llmctl config of an HF Llama, Mistral, Qwen2 or Qwen3 config.json (and its generation config, for
    token ids a Qwen config leaves out); a feature the model lacks is refused naming its key, never ignored."""
    family = hf.get("model_type")
    if family not in ARCHITECTURES:
        raise ValueError(
            f"model_type {family!r} is not supported: llmctl reads {', '.join(ARCHITECTURES)} checkpoints "
            "(not mixture-of-experts, multimodal or other architectures)"
        )
    problems = {
        key: hf[key]
        for key, fine in (("mlp_bias", False), ("hidden_act", "silu"), ("partial_rotary_factor", 1.0))
        if hf.get(key, fine) != fine
    }
    window = hf.get("sliding_window")
    windowed = hf.get("use_sliding_window", True) if family in ("qwen2", "qwen3") else True
    if windowed and window is not None and window < hf.get("max_position_embeddings", 2048):
        problems["sliding_window"] = window  # a window at or past the context is plain causal attention
    mixed = sorted({kind for kind in hf.get("layer_types") or () if kind != "full_attention"})
    if windowed and mixed:
        problems["layer_types"] = mixed
    rope = _rope_of(hf, problems)
    if problems:
        raise ValueError(f"unsupported {family} features in config.json: {problems}")
    d_model, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_head
    bias = bool(hf.get("attention_bias", False))
    generation = generation or {}
    ids = {
        role: hf.get(f"{role}_token_id", generation.get(f"{role}_token_id")) for role in ("bos", "eos", "pad")
    }
    ids = {role: value[0] if isinstance(value, list) else value for role, value in ids.items()}
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head),
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02),
        bos_token_id=ids["bos"] if ids["bos"] is not None else 1,
        eos_token_id=ids["eos"] if ids["eos"] is not None else 2,
        pad_token_id=ids["pad"],
        family=family,
        d_head=head_dim if head_dim != d_model // n_head or d_model % n_head else None,
        attention_bias=bias or family == "qwen2",
        output_bias=bias and family != "qwen2",
        qk_norm=family == "qwen3",
        **rope,
    )


def _rope_of(hf: dict, problems: dict) -> dict:
    """ModelConfig's rope fields from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (4.x); an unsupported scaling lands in `problems`."""
    parameters = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return {"rope_theta": theta}
    if kind not in ROPE_KEYS_OF or parameters.get("truncate", True) is not True:
        problems["rope_parameters.rope_type"] = kind
        return {"rope_theta": theta}
    for key in ("mscale", "mscale_all_dim", "partial_rotary_factor"):
        if parameters.get(key) not in (None, 0, 1, 1.0):
            problems[f"rope_parameters.{key}"] = parameters[key]
    fields = {name: parameters.get(ROPE_KEYS[name]) for name in ROPE_KEYS_OF[kind]}
    if fields.get("rope_original_max_seq_len") is None and kind != "linear":
        fields["rope_original_max_seq_len"] = hf.get("max_position_embeddings", 2048)
    if kind == "yarn" and fields["rope_factor"] is None:  # DeepSeek's way: the ratio of the two contexts
        fields["rope_factor"] = hf["max_position_embeddings"] / fields["rope_original_max_seq_len"]
    return {"rope_theta": theta, "rope_scaling": kind, **{k: v for k, v in fields.items() if v is not None}}


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
    generation = Path(directory) / GENERATION_CONFIG_FILE
    defaults = json.loads(generation.read_text()) if generation.is_file() else None
    return from_hf_config(json.loads((Path(directory) / CONFIG_FILE).read_text()), defaults)


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
