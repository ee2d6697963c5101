"""A GGUF file a user has from llama.cpp or Ollama, turned into a checkpoint directory llmctl finetunes and
serves: transformers' GGUF loading dequantizes the tensors (through the gguf package: F32, F16, Q8_0, Q4_0,
Q4_1, the K-quants...) and rebuilds the tokenizer as a `tokenizer.json` with the file's chat template; the
weights are then checked against llmctl's own model config and written as llmctl writes any checkpoint."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from llmctl.checkpoint import save_checkpoint
from llmctl.compress.gguf_rope import llama3_scaling
from llmctl.compress.gguf_vocabulary import pre_tokenizer_name, pre_tokenizer_spec
from llmctl.data.tokenizer import open_tokenizer
from llmctl.data.tokenizer_base import HF_TOKENIZER_FILE
from llmctl.errors import UserError, require_extra
from llmctl.model.hf_format import from_hf_config, without_tied_head


def import_gguf(path: Path, out: Path) -> Path:
    """Write the checkpoint a GGUF file holds to `out` (atomically), its weights in fp32."""
    gguf = require_extra("gguf", "export", "reading GGUF files")
    transformers = require_extra("transformers", "hf", "reading GGUF files")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise UserError(f"cannot read {path} as a GGUF model: {error}") from None
    fields = reader.fields
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None
    token_count = len(fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in fields else None
    # llama.cpp's form of Llama 3.1+'s RoPE scaling, which transformers' loader drops: read back below
    rope_freqs = next((tensor for tensor in reader.tensors if tensor.name == "rope_freqs.weight"), None)
    source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(**source)
        model = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError) as error:  # an architecture or type not read
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path} as a GGUF model: {reason}") from None
    try:
        config = from_hf_config(model.config.to_dict())
        if rope_freqs is not None:
            divisors = gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type)
            config = replace(config, **llama3_scaling(divisors, config))
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save_pretrained(staging)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        tokenizer_file = Path(staging) / HF_TOKENIZER_FILE
        if pre:
            restore_pre_tokenizer(tokenizer_file, pre)
        if token_count and tokenizer_file.is_file():
            drop_invented_tokens(tokenizer_file, token_count)
        return save_checkpoint(
            out, config, without_tied_head(state, config), tokenizer=open_tokenizer(staging)
        )


def restore_pre_tokenizer(tokenizer_file: Path, pre: str) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with the pre-tokenizers it knows; one it does not (SmolLM's
    digit-by-digit split, "smollm") becomes plain byte-level splitting, which encodes numbers otherwise than
    the model was trained on. Put the file's own pre-tokenizer back where llmctl knows it."""
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    wanted = pre_tokenizer_spec(pre)
    if wanted is None or pre_tokenizer_name(spec.get("pre_tokenizer")) == pre:
        return
    spec["pre_tokenizer"] = wanted
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def drop_invented_tokens(tokenizer_file: Path, count: int) -> None:
    """transformers' byte-level builder adds `<|endoftext|>` as its unknown token when the file's vocabulary
    lacks it (Llama 3's does), one token past the model's embeddings; the GGUF's token list is the vocabulary."""
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    added = spec.get("added_tokens") or []
    kept = [token for token in added if token["id"] < count]
    if len(kept) == len(added):
        return
    spec["added_tokens"] = kept
    invented = {token["content"] for token in added if token["id"] >= count}
    if spec["model"].get("unk_token") in invented:
        spec["model"]["unk_token"] = None
    spec["model"]["vocab"] = {text: index for text, index in spec["model"]["vocab"].items() if index < count}
    tokenizer_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
