"""GGUF, the file llama.cpp runs: llama.cpp's `llama` architecture tensor names and metadata, the
sentencepiece vocabulary inside, F32 / F16 / Q8_0 / Q4_0 tensors written with the `gguf` package.

Two things differ from a Hugging Face directory. llama.cpp rotates query/key pairs that sit next to each
other, HF pairs the two halves of a head, so Q and K rows are permuted (as llama.cpp's own converter does).
And a GGUF records the tokenizer's pieces, scores and types rather than the sentencepiece file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from llmctl.errors import UserError
from llmctl.model import ModelConfig, Transformer
from llmctl.model.transformer import meta_without_init

FILE_TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # Q8_0 and Q4_0 blocks run along each row


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'llmctl[export]'") from None
    return gguf


def _rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved one, per head, on the output rows."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).swapaxes(1, 2).reshape(rows, columns)


def _rope_halves(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `_rope_pairs`."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).swapaxes(1, 2).reshape(rows, columns)


def tensor_names(config: ModelConfig) -> dict[str, str]:
    """HF weight name -> llama.cpp's name, from the gguf package's own tables."""
    gguf = require_gguf()
    tensors = gguf.MODEL_TENSOR
    names = {
        "model.embed_tokens.weight": tensors.TOKEN_EMBD,
        "model.norm.weight": tensors.OUTPUT_NORM,
    }
    if not config.tie_embeddings:  # a tied head is token_embd itself in llama.cpp
        names["lm_head.weight"] = tensors.OUTPUT
    per_layer = {
        "input_layernorm": tensors.ATTN_NORM,
        "self_attn.q_proj": tensors.ATTN_Q,
        "self_attn.k_proj": tensors.ATTN_K,
        "self_attn.v_proj": tensors.ATTN_V,
        "self_attn.o_proj": tensors.ATTN_OUT,
        "post_attention_layernorm": tensors.FFN_NORM,
        "mlp.gate_proj": tensors.FFN_GATE,
        "mlp.up_proj": tensors.FFN_UP,
        "mlp.down_proj": tensors.FFN_DOWN,
    }
    for layer in range(config.n_layer):
        for hf, tensor in per_layer.items():
            names[f"model.layers.{layer}.{hf}.weight"] = tensor
    return {
        hf: gguf.TENSOR_NAMES[tensor].format(bid=hf.split(".")[2] if ".layers." in hf else "") + ".weight"
        for hf, tensor in names.items()
    }


def _rotary_rows(name: str, weight: torch.Tensor, config: ModelConfig, permute) -> torch.Tensor:
    """Apply `_rope_pairs` (export) or `_rope_halves` (import) to a query or key weight; others pass."""
    heads = {"q_proj.weight": config.n_head, "k_proj.weight": config.kv_heads}
    for suffix, count in heads.items():
        if name.endswith(suffix):
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


def _vocabulary(
    gguf, tokenizer_file: Path, vocab_size: int
) -> tuple[list[bytes], list[float], list[int], bool]:
    """Pieces, scores and types (sentencepiece's type numbers are llama.cpp's), padded with unused pieces
    to the model's embedding count, and whether a space is prefixed to the text."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(tokenizer_file).read_bytes())
    pieces = [piece.piece.encode() for piece in proto.pieces]
    scores = [piece.score for piece in proto.pieces]
    types = [int(piece.type) for piece in proto.pieces]
    for index in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{index}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return pieces, scores, types, proto.normalizer_spec.add_dummy_prefix


def write_gguf(
    path: Path,
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer_file: Path,
    file_type: str,
    name: str,
) -> None:
    """One GGUF file, written beside `path` and renamed into place."""
    gguf = require_gguf()
    if file_type not in FILE_TYPES:
        raise UserError(f"unknown GGUF type {file_type!r}; use one of {', '.join(FILE_TYPES)}")
    if not Path(tokenizer_file).is_file():
        raise UserError(
            "GGUF export needs a sentencepiece tokenizer.model in the checkpoint; this one has none "
            "(a tokenizer.json base is not supported by the llama vocabulary llmctl writes)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.ffn_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        getattr(gguf.LlamaFileType, {"f32": "ALL_F32"}.get(file_type, f"MOSTLY_{file_type.upper()}"))
    )
    pieces, scores, types, space_prefix = _vocabulary(gguf, tokenizer_file, config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space_prefix)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_unk_token_id(0)
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
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
    measuring an export's quality with llmctl's own evaluation."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        return reader.fields[key].contents()

    head_count = field("llama.attention.head_count")
    config = ModelConfig(
        vocab_size=field("llama.vocab_size"),
        d_model=field("llama.embedding_length"),
        n_layer=field("llama.block_count"),
        n_head=head_count,
        n_kv_head=field("llama.attention.head_count_kv"),
        d_ff=field("llama.feed_forward_length"),
        max_seq_len=field("llama.context_length"),
        rope_theta=field("llama.rope.freq_base"),
        norm_eps=field("llama.attention.layer_norm_rms_epsilon"),
        tie_embeddings="output.weight" not in {tensor.name for tensor in reader.tensors},
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
        pad_token_id=field("tokenizer.ggml.padding_token_id")
        if "tokenizer.ggml.padding_token_id" in reader.fields
        else None,
    )
    by_gguf_name = {gguf_name: hf for hf, gguf_name in tensor_names(config).items()}
    state = {}
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        hf_name = by_gguf_name[tensor.name]
        weight = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a writable copy
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
