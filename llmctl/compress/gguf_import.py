"""A GGUF file a user has from llama.cpp or Ollama, turned into a checkpoint directory llmctl finetunes and
serves: transformers' GGUF loading dequantizes the tensors (through the gguf package: F32, F16, Q8_0, Q4_0,
Q4_1, the K-quants...) and rebuilds the tokenizer as a `tokenizer.json` with the file's chat template; the
weights are then checked against llmctl's own model config and written as llmctl writes any checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from llmctl.checkpoint import save_checkpoint
from llmctl.data.tokenizer import open_tokenizer
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
        names = {tensor.name for tensor in gguf.GGUFReader(str(path)).tensors}
    except (ValueError, OSError) as error:
        raise UserError(f"cannot read {path} as a GGUF model: {error}") from None
    if "rope_freqs.weight" in names:  # llama.cpp's form of Llama 3.1+'s RoPE scaling, which the loader drops
        raise UserError(
            f"{path} holds Llama 3.1-style RoPE frequencies (rope_freqs), which llmctl import does not read "
            "yet; use the model's Hugging Face directory, which llmctl opens as it is"
        )
    source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(**source)
        model = transformers.AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError, OSError) as error:  # an architecture or type not read
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"cannot read {path} as a GGUF model: {reason}") from None
    try:
        config = from_hf_config(model.config.to_dict())
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    with tempfile.TemporaryDirectory() as staging:
        tokenizer.save_pretrained(staging)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        return save_checkpoint(
            out, config, without_tied_head(state, config), tokenizer=open_tokenizer(staging)
        )
