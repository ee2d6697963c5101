"""What a checkpoint came from, read from its own files without loading it: digests of its weights,
tokenizer and training corpus, its recipe, and its parent (the base of a finetune, the teacher of a
distillation, the source of a quantization)."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.digests import file_sha256, files_sha256, weights_sha256

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
CORPUS_MANIFEST = "manifest.json"
TAG_PREFIX = "llmctl."


@dataclass(frozen=True)
class Lineage:
    kind: str  # checkpoint, adapter or quantized
    weights_sha256: str
    files_sha256: str  # every file that decides its behaviour: config, tokenizer, template, weights
    tokenizer_sha256: str | None
    corpus_manifest_sha256: str | None
    recipe: str | None  # the recipe.toml saved with the checkpoint
    parent: str | None  # a path, as the checkpoint records it
    parent_role: str | None  # base, teacher or quantization source
    quantization: str | None  # the quantization_config recorded in config.json, as JSON

    def tags(self) -> dict[str, str]:
        """The registry tags that hold it; absent facts are left out rather than stored empty."""
        values = {
            "kind": self.kind,
            "weights_sha256": self.weights_sha256,
            "files_sha256": self.files_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "corpus_manifest_sha256": self.corpus_manifest_sha256,
            "recipe": self.recipe,
            "parent": self.parent,
            "parent_role": self.parent_role,
            "quantization": self.quantization,
        }
        return {TAG_PREFIX + key: value for key, value in values.items() if value is not None}


def read_lineage(checkpoint: Path) -> Lineage:
    checkpoint = Path(checkpoint)
    recipe_file = checkpoint / "recipe.toml"
    recipe = recipe_file.read_text(encoding="utf-8") if recipe_file.is_file() else None
    recipe_values = _parse_toml(recipe)
    kind, parent, role = _parent(checkpoint, recipe_values)
    quantization = _read_json(checkpoint / "config.json").get("quantization_config")
    tokenizer = next((checkpoint / n for n in TOKENIZER_FILES if (checkpoint / n).is_file()), None)
    return Lineage(
        kind=kind,
        weights_sha256=weights_sha256(checkpoint),
        files_sha256=files_sha256(checkpoint),
        tokenizer_sha256=file_sha256(tokenizer) if tokenizer else None,
        corpus_manifest_sha256=_corpus_manifest_digest(recipe_values, checkpoint),
        recipe=recipe,
        parent=parent,
        parent_role=role,
        quantization=json.dumps(quantization, sort_keys=True) if isinstance(quantization, dict) else None,
    )


def _parse_toml(text: str | None) -> dict:
    try:
        return tomllib.loads(text) if text else {}
    except tomllib.TOMLDecodeError:
        return {}


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _parent(checkpoint: Path, recipe: dict) -> tuple[str, str | None, str | None]:
    adapter = _read_json(checkpoint / "adapter_config.json")
    if adapter:
        return "adapter", adapter.get("base_model_name_or_path"), "base"
    quantization = _read_json(checkpoint / "config.json").get("quantization_config")
    if isinstance(quantization, dict):
        return "quantized", quantization.get("source"), "quantization source"
    if base := recipe.get("finetune", {}).get("base"):
        return "checkpoint", base, "base"
    if teacher := recipe.get("distill", {}).get("teacher"):
        return "checkpoint", teacher, "teacher"
    return "checkpoint", None, None


def _corpus_manifest_digest(recipe: dict, checkpoint: Path) -> str | None:
    """The training corpus's manifest, where the recipe names a corpus that is still there to read. A
    recipe's relative paths are relative to where training ran: the current directory, or (the usual
    layout, runs/NAME/checkpoints/step-N) one of the checkpoint's ancestors."""
    corpus = recipe.get("data", {}).get("corpus")
    if not corpus:
        return None
    roots = [Path.cwd(), *checkpoint.resolve().parents]
    for root in roots:
        manifest = root / corpus / CORPUS_MANIFEST
        if manifest.is_file():
            return file_sha256(manifest)
    return None


def recipe_keys(recipe: str | None) -> dict[str, str]:
    """A saved recipe.toml as dotted keys (model.d_model) and JSON values: what `models diff` compares."""
    return dotted_keys(_parse_toml(recipe))


def dotted_keys(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat
