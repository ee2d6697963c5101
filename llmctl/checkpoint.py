"""Checkpoint directories: a Hugging Face Llama directory plus llmctl's recipe and trainer state.

Every write goes to a temporary sibling directory that is flushed and renamed into place, so a crash never
leaves a checkpoint that looks complete but is not; a digest manifest written with the files catches one
damaged later (a truncated copy, a full disk, a bad sync) when it is opened.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from llmctl.atomic import atomic_directory, disk_full
from llmctl.data.chat_template import TEMPLATE_FILE
from llmctl.data.tokenizer import open_tokenizer
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.digests import digest_problem, write_digest_manifest
from llmctl.errors import UserError
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import CONFIG_FILE, load_model, read_quantization_config, write_model_files
from llmctl.quantization.quantize import QuantizationSettings, empty_quantized_model

RECIPE_FILE = "recipe.toml"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # a LoRA run's checkpoints are PEFT adapter directories
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_BASE_FILE = "adapter_base.json"  # the base's weights digest: an adapter applies to those weights only
TRAINER_STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


def save_checkpoint(
    directory: Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    recipe_toml: str | None = None,
    tokenizer: Tokenizer | None = None,
    trainer_state: dict | None = None,
    adapter_config: Any = None,
    adapter_base_sha256: str | None = None,
    quantization_config: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write a complete checkpoint directory atomically. `state_dict` uses HF names, no wrapper prefixes;
    with a PEFT `adapter_config`, it holds only the adapter's tensors and the directory is a PEFT adapter,
    which records `adapter_base_sha256`, its base's weights digest, when given;
    with a `quantization_config`, it holds quantized layers' buffers, recorded in config.json; a
    `chat_template` is written as chat_template.jinja, where transformers reads it too.
    A full disk is one clear error; the checkpoints already written are untouched."""
    try:
        _write_checkpoint(
            directory,
            config,
            state_dict,
            recipe_toml,
            tokenizer,
            trainer_state,
            adapter_config,
            adapter_base_sha256,
            quantization_config,
            chat_template,
        )
    except (OSError, RuntimeError) as error:
        if not disk_full(error, Path(directory).parent):
            raise
        raise UserError(
            f"cannot save checkpoint {directory}: no space left on the disk holding it; free space (or set "
            "checkpoint.keep_last lower) and resume with --resume auto"
        ) from None
    return Path(directory)


def _write_checkpoint(
    directory: Path,
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    recipe_toml: str | None,
    tokenizer: Tokenizer | None,
    trainer_state: dict | None,
    adapter_config: Any,
    adapter_base_sha256: str | None,
    quantization_config: dict | None,
    chat_template: str | None,
) -> None:
    with atomic_directory(directory) as staging:
        if adapter_config is None:
            write_model_files(staging, config, state_dict, quantization_config)
        else:
            adapter_config.save_pretrained(str(staging))
            save_file(state_dict, str(staging / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
            if adapter_base_sha256 is not None:
                base = {"weights_sha256": adapter_base_sha256}
                (staging / ADAPTER_BASE_FILE).write_text(json.dumps(base, indent=2) + "\n")
        if recipe_toml is not None:
            (staging / RECIPE_FILE).write_text(recipe_toml)
        if tokenizer is not None:
            tokenizer.copy_into(staging, config.max_seq_len)
        if chat_template is not None:
            (staging / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        if trainer_state is not None:
            torch.save(trainer_state, staging / TRAINER_STATE_FILE)
        write_digest_manifest(staging)


def step_directory(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and ((child / CONFIG_FILE).is_file() or (child / ADAPTER_CONFIG_FILE).is_file()):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def model_directory(path: Path) -> Path:
    """A checkpoint as given, or the newest checkpoint of a run directory. (A registered NAME@VERSION is
    resolved to its path by the commands: `commands.checkpoint_args`.)"""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        return latest_checkpoint(path) or path
    return path


def prune_checkpoints(run_dir: Path, keep_last: int, newest_step: int) -> None:
    """Keep the `keep_last` newest checkpoints up to `newest_step`, the run's current step. Any with a higher
    step (left by a run resumed from an earlier checkpoint) are not this run's to delete."""
    own = [path for step, path in list_checkpoints(run_dir) if step <= newest_step]
    for path in own[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def is_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint cannot be opened, or None: a missing file, or one that does not match its digest."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() and not (path / ADAPTER_CONFIG_FILE).is_file():
        return f"it has no {CONFIG_FILE}"
    return digest_problem(path)


def newest_checkpoint_under(root: Path = Path("runs")) -> Path:
    """The most recently written checkpoint under `root` (what chat/serve/eval use when given none)."""
    candidates = [p.parent for p in Path(root).glob("**/config.json") if not p.parent.name.startswith(".")]
    if not candidates:
        raise UserError(
            f"no checkpoint found under {root}/; train one (llmctl train recipes/tiny.toml) or pass a path"
        )
    return max(candidates, key=lambda path: (path / CONFIG_FILE).stat().st_mtime)


def open_model(
    path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a checkpoint's model, turning a missing or malformed directory into one clear error."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"not a checkpoint: {path} has no {CONFIG_FILE}")
    problem = digest_problem(path)
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}; use an earlier checkpoint of the run")
    try:
        return load_model(path, dtype=dtype, device=device, prepare=_quantized_layers(path))
    except (ValueError, FileNotFoundError, KeyError, SafetensorError) as error:
        raise UserError(f"cannot load checkpoint {path}: {error}") from None


def _quantized_layers(path: Path) -> Callable[[Transformer], Transformer] | None:
    """For a quantized checkpoint, what swaps the empty model's layers for quantized ones before loading."""
    settings = read_quantization_config(path)
    if settings is None:
        return None
    return partial(empty_quantized_model, settings=QuantizationSettings.from_config(settings))


def open_checkpoint(
    path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[Transformer, Tokenizer]:
    """A checkpoint's model and the tokenizer it was trained with, checked to fit each other."""
    path = Path(path)
    model = open_model(path, dtype=dtype, device=device)
    tokenizer = open_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer mismatch in {path}: {tokenizer.vocab_size} pieces but the model has "
            f"{model.config.vocab_size} embeddings"
        )
    return model, tokenizer
