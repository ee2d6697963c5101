"""`llmctl up DOCS`: one command from a folder of documents to a served, evaluated, versioned domain model
within a time budget. The work is `llmctl.pipeline.up`; this prints its plan and progress, and serves."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)

Docs = Annotated[
    Path, typer.Argument(metavar="DOCS", help="A folder of documents: txt, md, html, pdf, docx...")
]
Base = Annotated[
    str | None,
    typer.Option(
        help="Adapt this model instead of training one: a model directory, a .gguf file or NAME@ALIAS."
    ),
]
Budget = Annotated[str, typer.Option(help="Wall-clock time for the whole pipeline: 30m, 1h, 1h30m, 90s.")]
Out = Annotated[
    Path | None, typer.Option("--out", "-o", help="Where every stage's output goes (default runs/NAME).")
]
Name = Annotated[str | None, typer.Option(help="The registered model's name (default: the folder's name).")]
Serve = Annotated[bool, typer.Option("--serve", help="Serve the model at the end (OpenAI-compatible API).")]
Port = Annotated[int, typer.Option(min=1, max=65535, help="With --serve: the port.")]
Overrides = Annotated[
    list[str],
    typer.Option(
        "--set", help="A stage's setting: --set train.max_minutes=5, --set corpus.val_fraction=0.2."
    ),
]
Settings = Annotated[Path | None, typer.Option(help="A TOML file of the same stage settings as --set.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show the plan and stop.")]
Tui = Annotated[
    bool,
    typer.Option("--tui", help="Watch training in the Textual monitor; quitting it checkpoints and stops."),
]
RUN_DIRECTORIES = {"train": "train", "adapt": "adapt", "chat": "chat-train"}  # training stage -> its run


@app.command(name="up")
def up(
    docs: Docs,
    base: Base = None,
    budget: Budget = "30m",
    out: Out = None,
    name: Name = None,
    serve: Serve = False,
    port: Port = 8000,
    overrides: Overrides = [],  # noqa: B006  (Typer reads the default; it is never mutated)
    settings: Settings = None,
    dry_run: DryRun = False,
    tui: Tui = False,
) -> None:
    """Corpus, tokenizer, training (or adaptation of --base), evaluation, int8 when it pays, a registry
    version and model card, a report, and with --serve the API: re-running reuses every unchanged stage."""
    from llmctl.commands.checkpoint_args import resolve_model_path
    from llmctl.commands.up_console import UpConsole
    from llmctl.errors import UserError
    from llmctl.pipeline.budget import parse_duration
    from llmctl.pipeline.request import TrainingInterrupted, UpRequest
    from llmctl.pipeline.settings import read_settings
    from llmctl.pipeline.up import UpPipeline

    if tui and serve:
        raise UserError(
            "--tui and --serve: run without --tui to serve at the end, or serve NAME@latest after"
        )
    name = name or _model_name(docs)
    request = UpRequest(
        docs=docs,
        out=out or Path("runs") / name,
        budget_seconds=parse_duration(budget),
        name=name,
        base=resolve_model_path(base) if base else None,
        base_label=base,
        settings=read_settings(settings, overrides),
    )
    console = UpConsole()
    pipeline = UpPipeline(request, console.on_event, console.on_training_event)
    plan = pipeline.plan()
    console.print_plan(request, plan.stages)
    if dry_run:
        return
    if tui:
        raise typer.Exit(_under_monitor(request, [stage.name for stage in plan.stages]))
    try:
        result = pipeline.run(plan)
    except (TrainingInterrupted, KeyboardInterrupt) as stopped:
        console.interrupted(request, stopped)
        sys.exit(130)
    console.print_summary(request, result, port if serve else None)
    if serve:
        _serve(result.model, port)


def _serve(model: Path, port: int) -> None:
    from llmctl.commands.serve import serve

    serve(models=[str(model)], port=port, compile=None)


def _under_monitor(request, stages: list[str]) -> int:
    """This command again, without --tui, as a child the monitor follows; its exit code."""
    from llmctl.commands.monitor import train_with_monitor

    runs = [request.out / RUN_DIRECTORIES[stage] for stage in stages if stage in RUN_DIRECTORIES]
    arguments = [argument for argument in sys.argv[1:] if argument != "--tui"]
    return train_with_monitor(runs, arguments, arguments, show_output=True)


def _model_name(docs: Path) -> str:
    """The documents folder's name as a registry name: letters, digits, '.', '_' and '-'."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in docs.resolve().name).strip("-.")
    return cleaned or "domain"
