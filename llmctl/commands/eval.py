"""`llmctl eval`: perplexity, generation metrics, lm-eval tasks and suites; `eval compare`; `eval suite build`."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.commands.groups import DefaultToRun

app = typer.Typer(
    add_completion=False,
    cls=DefaultToRun,
    help="Evaluate checkpoints: perplexity, generation metrics, lm-eval tasks, suites.",
)
suite_app = typer.Typer(
    add_completion=False, help="Build evaluation suites from your own data.", no_args_is_help=True
)
app.add_typer(suite_app, name="suite")


@app.command()
def run(
    checkpoint: str | None = typer.Argument(
        None, help="Checkpoint directory or registered NAME@VERSION|ALIAS (default: the newest under runs/)."
    ),
    adapter: Path | None = typer.Option(None, help="A LoRA adapter to apply to the checkpoint (its base)."),
    data: Path | None = typer.Option(
        None,
        help="Perplexity data (corpus dir, .jsonl, .txt); with --suite domain, the suite folder or corpus.",
    ),
    suite: str | None = typer.Option(None, help="'domain' or a suite .toml file."),
    tasks: str | None = typer.Option(None, help="Comma-separated lm-eval task names."),
    include_path: Path | None = typer.Option(None, help="Folder of local lm-eval task YAML files."),
    limit: int | None = typer.Option(None, min=1, help="lm-eval: at most this many examples per task."),
    window: int | None = typer.Option(None, min=2, help="Perplexity window (default: the context)."),
    stride: int | None = typer.Option(None, min=1, help="Perplexity stride (default: half the window)."),
    out: Path | None = typer.Option(None, help="Write every number and its configuration to this JSON file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    seed: int = typer.Option(0),
) -> None:
    """Evaluate a checkpoint and print a table; `--out` keeps the numbers for `llmctl eval compare`."""
    from llmctl.commands.checkpoint_args import resolve_checkpoint
    from llmctl.commands.eval_report import print_results, write_results
    from llmctl.errors import UserError
    from llmctl.evaluate.runner import Evaluator

    if not (data or suite or tasks):
        raise UserError("nothing to evaluate: pass --data FILE_OR_DIR, --suite domain|FILE or --tasks NAMES")
    path = resolve_checkpoint(checkpoint)
    if out is not None:  # checked before the evaluation, which may take hours
        check_results_file(out, [p for p in (path, data) if p is not None], overwrite)
    evaluator = Evaluator(path, seed=seed, adapter=adapter)
    names = [name.strip() for name in (tasks or "").split(",") if name.strip()]
    record = evaluator.evaluate(data, suite, names, include_path, limit, window, stride)
    print_results(record)
    if out:
        write_results(out, record)


def check_results_file(out: Path, inputs: list[Path], overwrite: bool) -> None:
    from llmctl.atomic import check_output
    from llmctl.errors import UserError

    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file path such as {out / 'eval.json'}")
    check_output(out, inputs, overwrite)


@app.command()
def compare(
    first: Path = typer.Argument(..., help="A results JSON from `llmctl eval --out`."),
    second: Path = typer.Argument(..., help="Another results JSON."),
) -> None:
    """Two result files side by side, with the differences, and for perplexity on the same documents a paired
    bootstrap saying whether the difference is significant."""
    from llmctl.commands.eval_report import print_comparison, print_paired_tests
    from llmctl.evaluate.results import read_results

    a, b = read_results(first), read_results(second)
    print_comparison(first, a, second, b)
    print_paired_tests(a, b)


@suite_app.command("build")
def build_suite(
    corpus: Path = typer.Argument(..., help="A corpus directory; its held-out split is used."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the suite (suite.toml and its data)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    seed: int = typer.Option(0),
) -> None:
    """Create the domain suite's data (cloze and heading tasks) from your own held-out corpus."""
    from llmctl.atomic import check_output
    from llmctl.evaluate.suite import build_domain_suite

    check_output(out, [corpus], overwrite)
    typer.echo(f"wrote {build_domain_suite(corpus, out, seed)}")
