"""`llmctl models`: register checkpoints as immutable versions with their lineage, alias them, attach eval
results and compare versions, in MLflow's model registry (runs/mlflow.db unless MLFLOW_TRACKING_URI or
--registry names another)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from llmctl.errors import UserError

if TYPE_CHECKING:  # the registry imports MLflow: only when a command runs
    from llmctl.registry.store import ModelRegistry, ModelVersion

app = typer.Typer(add_completion=False, no_args_is_help=True)
console = Console(soft_wrap=True)  # digests and paths stay whole on one line


def registry_option() -> str | None:
    return typer.Option(
        None,
        "--registry",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite under runs/mlflow.db).",
        show_default=False,
    )


def _registry(uri: str | None) -> ModelRegistry:
    from llmctl.registry.store import ModelRegistry

    return ModelRegistry(uri)


@app.callback()
def models() -> None:
    """Model versions: register, list, show, alias, attach eval results, diff. Use NAME@VERSION or NAME@ALIAS
    wherever a checkpoint path is taken (chat, serve, eval, finetune, quantize, prune, export)."""


@app.command()
def register(
    checkpoint: Path = typer.Argument(..., help="A checkpoint directory (or a run directory: its newest)."),
    name: str = typer.Option(..., "--name", help="The registered model's name, e.g. legal."),
    alias: str | None = typer.Option(None, help="Point this alias (prod, staging, ...) at the new version."),
    note: str | None = typer.Option(None, help="A description kept with the version."),
    upload: bool | None = typer.Option(
        None,
        "--upload/--no-upload",
        help="Copy the checkpoint into the store's artefacts (default: only for a tracking server).",
        show_default=False,
    ),
    registry: str | None = registry_option(),
) -> None:
    """Give a checkpoint the next version number of NAME, recording its weights, tokenizer and corpus
    digests, recipe and parent."""
    from llmctl.commands.checkpoint_args import checkpoint_path

    path = checkpoint_path(checkpoint)
    if path != checkpoint:
        console.print(f"registering the newest checkpoint of {checkpoint}: {path}", markup=False)
    version = _registry(registry).register(path, name, alias, note, upload)
    console.print(f"registered {version.reference}" + _aliases(version), markup=False)
    _print_version(version)


LIST_COLUMNS = ("version", "aliases", "created", "kind", "weights", "parent", "source", "note")


@app.command("list")
def list_versions(
    name: str | None = typer.Argument(None, help="One model's versions (default: every model)."),
    registry: str | None = registry_option(),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per version, for scripts."),
) -> None:
    """Registered versions, oldest first, with their aliases and weights digest. A table on a terminal;
    in a pipe, tab-separated lines with nothing cut short."""
    versions = _registry(registry).versions(name)
    if not versions:
        raise UserError(f"no versions of {name!r} are registered" if name else "no models are registered yet")
    rows = [
        (
            version.reference,
            ", ".join(version.aliases),
            _time(version.created),
            version.lineage("kind") or "",
            version.lineage("weights_sha256") or "",
            version.lineage("parent_version") or version.lineage("parent") or "",
            version.source,
            version.note,
        )
        for version in versions
    ]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(dict(zip(LIST_COLUMNS, row, strict=True))))
        return
    if not console.is_terminal:
        for row in (LIST_COLUMNS, *rows):
            typer.echo("\t".join(value.replace("\t", " ").replace("\n", " ") for value in row))
        return
    table = Table(title="registered models")
    for column in LIST_COLUMNS:
        table.add_column(column)
    for row in rows:
        table.add_row(*row[:4], row[4][:12], *row[5:])
    console.print(table)


@app.command()
def show(
    reference: str = typer.Argument(..., help="NAME@VERSION or NAME@ALIAS."),
    registry: str | None = registry_option(),
) -> None:
    """One version: where it is, its lineage, recipe and attached evaluation results."""
    version = _registry(registry).get(reference)
    console.print(f"{version.reference}{_aliases(version)}", markup=False)
    _print_version(version)
    recipe = version.lineage("recipe")
    if recipe:
        console.print("recipe:", markup=False)
        console.print(recipe.rstrip(), markup=False, highlight=False)


@app.command()
def alias(
    reference: str = typer.Argument(..., help="NAME@VERSION (or NAME@ALIAS) to point the alias at."),
    name: str = typer.Argument(..., help="The alias, e.g. prod."),
    registry: str | None = registry_option(),
) -> None:
    """Point an alias at a version (moving it from the version that had it)."""
    version = _registry(registry).set_alias(reference, name)
    console.print(f"{version.name}@{name} -> {version.reference}", markup=False)


@app.command()
def attach(
    reference: str = typer.Argument(..., help="NAME@VERSION or NAME@ALIAS."),
    results: Path = typer.Argument(..., help="A results file from `llmctl eval --out`."),
    label: str | None = typer.Option(None, help="Name of this evaluation (default: the file's name)."),
    force: bool = typer.Option(False, "--force", help="Attach results measured on other weights."),
    registry: str | None = registry_option(),
) -> None:
    """Keep an evaluation's numbers with a version, for `models show` and `models diff`."""
    from llmctl.evaluate.results import read_results

    record = read_results(results)
    version = _registry(registry).attach(reference, record, results, label or results.stem, force)
    metrics = version.evals()[label or results.stem]["metrics"]
    console.print(f"attached {len(metrics)} metrics from {results} to {version.reference}", markup=False)


@app.command()
def diff(
    first: str = typer.Argument(..., help="NAME@VERSION or NAME@ALIAS."),
    second: str = typer.Argument(..., help="Another."),
    all_keys: bool = typer.Option(False, "--all", help="List recipe keys that are the same too."),
    registry: str | None = registry_option(),
) -> None:
    """Two versions side by side: lineage, the recipe keys that differ, and every attached metric."""
    from llmctl.registry.diff import diff_versions

    store = _registry(registry)
    a, b = store.get(first), store.get(second)
    diff = diff_versions(a, b, all_keys)
    table = Table(title=f"{a.reference} vs {b.reference}")
    for column, justify in (
        ("", "left"),
        (a.reference, "right"),
        (b.reference, "right"),
        ("change", "right"),
    ):
        table.add_column(column, justify=justify)
    for rows in (diff.lineage, diff.recipe):
        for row in rows:
            table.add_row(row.key, row.left, row.right, "differs" if row.differs else "")
        table.add_section()
    for metric in diff.metrics:
        change = "" if metric.change is None else f"{metric.change:+,.4f}"
        table.add_row(metric.key, _number(metric.left), _number(metric.right), change)
    console.print(table)


def _print_version(version: ModelVersion) -> None:
    rows = [
        ("source", str(version.source)),
        ("created", _time(version.created)),
        ("kind", version.lineage("kind")),
        ("weights sha256", version.lineage("weights_sha256")),
        ("files sha256", version.lineage("files_sha256")),
        ("tokenizer sha256", version.lineage("tokenizer_sha256")),
        ("corpus manifest sha256", version.lineage("corpus_manifest_sha256")),
        ("parent", _parent(version)),
        ("quantization", version.lineage("quantization")),
        ("training run", version.lineage("training_run")),
        ("note", version.note),
    ]
    for label, value in rows:
        if value:
            console.print(f"  {label}: {value}", markup=False, highlight=False)
    for label, attached in version.evals().items():
        console.print(f"  eval {label} ({attached['file']}):", markup=False, highlight=False)
        for metric, number in attached["metrics"].items():
            console.print(f"    {metric} = {number:,.4f}", markup=False, highlight=False)


def _parent(version: ModelVersion) -> str | None:
    parent = version.lineage("parent")
    if parent is None:
        return None
    registered = version.lineage("parent_version")
    return f"{parent} ({version.lineage('parent_role')}" + (
        f", registered as {registered})" if registered else ")"
    )


def _aliases(version: ModelVersion) -> str:
    return f" (alias {', '.join(version.aliases)})" if version.aliases else ""


def _time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:,.4f}"
