"""GGUF, the file llama.cpp runs: the architecture llama.cpp expects for each family (`llama` for Llama and
Mistral, `qwen2`, `qwen3`), its tensor names and metadata, the tokenizer inside (gguf_vocabulary), the chat
template, and F32 / F16 / Q8_0 / Q4_0 tensors written with the `gguf` package.

Three things differ from a Hugging Face directory. llama.cpp's `llama` architecture rotates query/key pairs
that sit next to each other where HF pairs the two halves of a head, so its Q and K rows are permuted (as
llama.cpp's own converter does; the Qwen architectures rotate halves, as HF does). Llama 3's RoPE scaling is
a `rope_freqs` tensor of per-pair divisors. And a GGUF records the tokenizer's tokens rather than its file.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from llmctl.compress.gguf_rope import llama3_scaling, rope_frequency_divisors
from llmctl.errors import UserError
from llmctl.model import ModelConfig, Transformer
from llmctl.model.transformer import meta_without_init

FILE_TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 blocks run along each row
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'llmctl[export]'") from None
    return gguf


def _rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved one, per head, on the output rows (a bias's
    entries are rows too)."""
    rows = weight.shape[0]
    grouped = weight.reshape(heads, 2, rows // heads // 2, -1).swapaxes(1, 2)
    return grouped.reshape(weight.shape)


def _rope_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `_rope_pairs`."""
    rows = weight.shape[0]
    grouped = weight.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2)
    return grouped.reshape(weight.shape)


def interleaves_rotary_pairs(config: ModelConfig) -> bool:
    """Whether llama.cpp's architecture for this family rotates adjacent pairs (so Q and K are permuted)."""
    return ARCHITECTURES[config.family] == "llama"


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """HF tensor name -> llama.cpp's name, from the gguf package's own tables, for the config's options."""
    gguf = require_gguf()
    tensors = gguf.MODEL_TENSOR
    names = {
        "model.embed_tokens.weight": (tensors.TOKEN_EMBD, "weight"),
        "model.norm.weight": (tensors.OUTPUT_NORM, "weight"),
    }
    if not config.tie_embeddings:  # a tied head is token_embd itself in llama.cpp
        names["lm_head.weight"] = (tensors.OUTPUT, "weight")
    per_layer = {
        "input_layernorm.weight": tensors.ATTN_NORM,
        "self_attn.q_proj.weight": tensors.ATTN_Q,
        "self_attn.k_proj.weight": tensors.ATTN_K,
        "self_attn.v_proj.weight": tensors.ATTN_V,
        "self_attn.o_proj.weight": tensors.ATTN_OUT,
        "post_attention_layernorm.weight": tensors.FFN_NORM,
        "mlp.gate_proj.weight": tensors.FFN_GATE,
        "mlp.up_proj.weight": tensors.FFN_UP,
        "mlp.down_proj.weight": tensors.FFN_DOWN,
    }
    if config.attention_bias:
        qkv = {"q": tensors.ATTN_Q, "k": tensors.ATTN_K, "v": tensors.ATTN_V}
        per_layer |= {f"self_attn.{part}_proj.bias": tensor for part, tensor in qkv.items()}
    if config.output_bias:
        per_layer["self_attn.o_proj.bias"] = tensors.ATTN_OUT
    if config.qk_norm:
        per_layer |= {
            "self_attn.q_norm.weight": tensors.ATTN_Q_NORM,
            "self_attn.k_norm.weight": tensors.ATTN_K_NORM,
        }
    for layer in range(config.n_layer):
        for hf, tensor in per_layer.items():
            names[f"model.layers.{layer}.{hf}"] = (tensor, hf.rsplit(".", 1)[1])
    return {
        hf: gguf.TENSOR_NAMES[tensor].format(bid=hf.split(".")[2] if ".layers." in hf else "") + f".{kind}"
        for hf, (tensor, kind) in names.items()
    }


def _rotary_rows(name: str, weight: torch.Tensor, config: ModelConfig, permute) -> torch.Tensor:
    """Apply `_rope_pairs` (export) or `_rope_halves` (import) to a query or key weight or bias, for the
    architectures that interleave pairs; others pass."""
    if not interleaves_rotary_pairs(config):
        return weight
    heads = {"q_proj": config.n_head, "k_proj": config.kv_heads}
    for projection, count in heads.items():
        if f".{projection}." in name:
            return permute(weight, count)
    return weight


def _tensor_type(gguf, name: str, weight: np.ndarray, file_type: str):
    """Norms stay F32; Q4_0 files keep the output head Q8_0 (llama.cpp's own choice is a 6-bit type the
    gguf package cannot write); rows that blocks do not divide fall back to F16."""
    kinds = gguf.GGMLQuantizationType
    if weight.ndim == 1 or file_type == "f32":
        return kinds.F32
    if file_type == "f16":
        return kinds.F16
    if weight.shape[-1] % QUANT_BLOCK:
        return kinds.F16
    if file_type == "q4_0" and name != "output.weight":
        return kinds.Q4_0
    return kinds.Q8_0


def _export_problem(config: ModelConfig) -> str | None:
    """What llama.cpp's architecture for this config cannot hold, or None."""
    if config.rope_scaling == "yarn":
        return "YaRN RoPE scaling is not written to GGUF yet (linear and llama3 are)"
    if config.family == "qwen3" and config.attention_bias:
        return "llama.cpp's qwen3 architecture has no attention biases"
    return None


def write_gguf(
    path: Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer_file: Path,
    file_type: str,
    name: str,
    chat_template: str | None = None,
) -> None:
    """One GGUF file, written beside `path` and renamed into place."""
    from llmctl.compress.gguf_vocabulary import read_vocabulary

    gguf = require_gguf()
    if file_type not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {file_type!r}; use one of {', '.join(FILE_TYPES)}")
    if not Path(tokenizer_file).is_file():
        raise UserError(f"GGUF export needs the checkpoint's tokenizer; {tokenizer_file} does not exist")
    problem = _export_problem(config)
    if problem:
        raise UserError(f"cannot export this {config.family} model to GGUF: {problem}")
    vocabulary = read_vocabulary(gguf, tokenizer_file, config.vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(partial), ARCHITECTURES[config.family])
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_factor)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        getattr(gguf.LlamaFileType, {"f32": "ALL_F32"}.get(file_type, f"MOSTLY_{file_type.upper()}"))
    )
    writer.add_tokenizer_model(vocabulary.model)
    if vocabulary.pre:
        writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    if vocabulary.scores:
        writer.add_token_scores(vocabulary.scores)
    if vocabulary.merges:
        writer.add_token_merges(vocabulary.merges)
    writer.add_add_space_prefix(vocabulary.space_prefix)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if vocabulary.unknown_id is not None:
        writer.add_unk_token_id(vocabulary.unknown_id)
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(vocabulary.add_bos)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(chat_template)
    if config.rope_scaling == "llama3":
        writer.add_tensor(
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_frequency_divisors(config)
        )
    for hf_name, gguf_name in tensor_names(config).items():
        weight = _rotary_rows(hf_name, state[hf_name].detach().float(), config, _rope_pairs).numpy()
        kind = _tensor_type(gguf, gguf_name, weight, file_type)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, weight)
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, weight.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, kind), raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_gguf_model(path: Path) -> Transformer:
    """The model a GGUF file holds, its tensors dequantized to fp32 (what llama.cpp computes with): for
    measuring an export's quality with llmctl's own evaluation. Llama 3 `rope_freqs` are read back into the
    scaling settings that give them (`gguf_rope.llama3_scaling`)."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))
    architecture = reader.fields["general.architecture"].contents()
    if architecture not in ("llama", "qwen2", "qwen3"):
        raise UserError(f"{path}: llmctl reads llama, qwen2 and qwen3 GGUF files, not {architecture}")

    def field(key: str, default=None):
        name = f"{architecture}.{key}" if not key.startswith("tokenizer.") else key
        return reader.fields[name].contents() if name in reader.fields else default

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    head_count, embedding = field("attention.head_count"), field("embedding_length")
    key_length = field("attention.key_length", embedding // head_count)
    settings = dict(
        family=architecture,
        vocab_size=field("vocab_size") or len(field("tokenizer.ggml.tokens")),
        d_model=embedding,
        n_layer=field("block_count"),
        n_head=head_count,
        n_kv_head=field("attention.head_count_kv"),
        d_ff=field("feed_forward_length"),
        d_head=key_length if key_length * head_count != embedding else None,
        max_seq_len=field("context_length"),
        rope_theta=field("rope.freq_base"),
        norm_eps=field("attention.layer_norm_rms_epsilon"),
        attention_bias="blk.0.attn_q.bias" in tensors,
        output_bias="blk.0.attn_output.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        tie_embeddings="output.weight" not in tensors,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id"),
    )
    if field("rope.scaling.type") == "linear":
        settings |= {"rope_scaling": "linear", "rope_factor": field("rope.scaling.factor")}
    config = ModelConfig(**settings)
    if "rope_freqs.weight" in tensors:
        divisors = gguf.quants.dequantize(
            tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type
        )
        try:
            config = replace(config, **llama3_scaling(divisors, config))
        except ValueError as error:
            raise UserError(f"{path}: {error}") from None
    by_gguf_name = {gguf_name: hf for hf, gguf_name in tensor_names(config).items()}
    state = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        weight = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
        if tensor.name == "rope_freqs.weight":  # read into the config above
            continue
        hf_name = by_gguf_name[tensor.name]
        state[hf_name] = _rotary_rows(hf_name, weight, config, _rope_halves)
    with meta_without_init():
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    model.init_rope()
    return model.eval()
