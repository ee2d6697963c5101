"""Checkpoint arguments of the commands: a path, a run directory (its newest checkpoint) or a registered
NAME@VERSION / NAME@ALIAS (its weights checked), NAME=that, or the newest checkpoint under runs/. References
are resolved here, at the edge: the engines below take paths and never know the registry exists."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.checkpoint import model_directory, newest_checkpoint_under
from llmctl.errors import UserError
from llmctl.registry.reference import registered_reference

if TYPE_CHECKING:
    from llmctl.recipe import Recipe


def default_name(path: Path) -> str:
    """runs/legal/checkpoints/step-00001000 -> legal; any other directory -> its own name."""
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def resolve_checkpoint(path: str | None) -> Path:
    if path:
        return resolve_model_path(path)
    found = newest_checkpoint_under(Path("runs"))
    print(f"using the newest checkpoint: {found}", file=sys.stderr)
    return found


def resolve_model_path(spec: str | Path) -> Path:
    """A checkpoint path as given, or the digest-checked path of a registered version."""
    reference = registered_reference(spec)
    if reference is None:
        return Path(spec)
    from llmctl.registry.store import ModelRegistry  # MLflow loads only for a reference

    return ModelRegistry().resolve(reference)


def checkpoint_path(spec: str | Path) -> Path:
    """A checkpoint argument as the directory it names: a registered version's, or a run's newest."""
    return model_directory(resolve_model_path(spec))


def resolve_recipe_references(recipe: Recipe) -> Recipe:
    """A recipe whose finetune.base and distill.teacher may be registered references, with their paths."""
    if recipe.finetune.base and registered_reference(recipe.finetune.base):
        recipe.finetune.base = str(resolve_model_path(recipe.finetune.base))
    if recipe.distill.teacher and registered_reference(recipe.distill.teacher):
        recipe.distill.teacher = str(resolve_model_path(recipe.distill.teacher))
    return recipe


def parse_models(arguments: list[str] | None) -> dict[str, Path]:
    if not arguments:
        path = resolve_checkpoint(None)
        return {default_name(path): path}
    named: dict[str, Path] = {}
    for argument in arguments:
        name, sep, spec = argument.partition("=")
        spec = spec if sep else name
        path = resolve_model_path(spec)
        if not sep:  # a registered model is served under its reference, demo@prod
            name = spec if registered_reference(spec) else default_name(path)
        if name in named:
            raise UserError(f"model name {name!r} is used twice; name them: A=PATH B=PATH")
        named[name] = path
    return named
