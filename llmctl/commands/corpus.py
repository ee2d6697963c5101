"""`llmctl corpus build|stats|plan`: turn a folder of documents into a clean, deduplicated train/val corpus,
and size the data for a token budget."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from llmctl.data.compression import DOCUMENT_BYTES

app = typer.Typer(add_completion=False, help="Build and inspect training corpora.", no_args_is_help=True)


Sources = Annotated[
    list[str], typer.Argument(help="Files, folders or quoted globs of .txt/.md/.jsonl/.html.")
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output corpus directory (written atomically).")]
RecipeFile = Annotated[
    Path | None,
    typer.Option(
        help="Take filter thresholds, cleaning rules and executor settings from this recipe's [data] section."
    ),
]
TextField = Annotated[str, typer.Option(help="JSONL field, or Parquet/CSV column, holding the text.")]
Html = Annotated[
    str,
    typer.Option(
        help="HTML: main (the main content, trafilatura; the html extra) or all (all visible text)."
    ),
]
ScrubPii = Annotated[bool, typer.Option("--scrub-pii", help="Replace e-mails, phones, IPs, card numbers.")]
ExactDedup = Annotated[bool, typer.Option("--exact-dedup/--no-exact-dedup")]
NearDedup = Annotated[bool, typer.Option("--near-dedup/--no-near-dedup", help="MinHash LSH near-duplicates.")]
NearDupThreshold = Annotated[float, typer.Option(min=0.05, max=1.0, help="Jaccard similarity that counts.")]
ValFraction = Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of documents held out.")]
Seed = Annotated[int, typer.Option(help="Seed of the train/val split.")]
MinChars = Annotated[int | None, typer.Option(help="Filter: minimum characters.")]
MaxChars = Annotated[int | None, typer.Option(help="Filter: maximum characters.")]
MinAlpha = Annotated[float | None, typer.Option(help="Filter: minimum share of letters.")]
MaxRepeatedLines = Annotated[float | None, typer.Option(help="Filter: maximum share of repeated lines.")]
MaxRepeatedNgrams = Annotated[float | None, typer.Option(help="Filter: maximum repeated 5-grams.")]
Language = Annotated[
    str | None, typer.Option(help="Filter: keep only this language (ISO code; needs py3langid).")
]
MaxDocumentBytes = Annotated[
    int,
    typer.Option(
        min=1,
        help="Skip a document (a file, a JSONL line, a DOCX's parts) that grows past this many bytes as it is "
        "decompressed or extracted; memory stays bounded by it.",
    ),
]
Strict = Annotated[bool, typer.Option(help="Stop at the first unreadable file or malformed line.")]
Workers = Annotated[
    int, typer.Option(min=0, help="Worker processes, or with --executor tasks at once (0: one per core).")
]
Executor = Annotated[
    str | None,
    typer.Option(
        help="Run as datatrove stages: local, ray or slurm (the distributed extra); default: embedded."
    ),
]
Tasks = Annotated[int, typer.Option(min=1, help="With --executor: input shards of the per-document stages.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output directory.")]
THRESHOLDS = (
    "min_chars",
    "max_chars",
    "min_alpha_fraction",
    "max_repeated_line_fraction",
    "max_repeated_ngram_fraction",
    "language",
)


@app.command()
def build(
    context: typer.Context,
    sources: Sources,
    out: Out,
    recipe: RecipeFile = None,
    text_field: TextField = "text",
    html: Html = "main",
    scrub_pii: ScrubPii = False,
    exact_dedup: ExactDedup = True,
    near_dedup: NearDedup = True,
    near_dup_threshold: NearDupThreshold = 0.8,
    val_fraction: ValFraction = 0.05,
    seed: Seed = 0,
    min_chars: MinChars = None,
    max_chars: MaxChars = None,
    min_alpha_fraction: MinAlpha = None,
    max_repeated_line_fraction: MaxRepeatedLines = None,
    max_repeated_ngram_fraction: MaxRepeatedNgrams = None,
    language: Language = None,
    max_document_bytes: MaxDocumentBytes = DOCUMENT_BYTES,
    strict: Strict = False,
    workers: Workers = 0,
    executor: Executor = None,
    tasks: Tasks = 2,
    overwrite: Overwrite = False,
) -> None:
    """Clean, filter, scrub, deduplicate and split documents into JSONL shards with a manifest."""
    from llmctl.commands.corpus_report import print_build_summary
    from llmctl.data.corpus import build_corpus
    from llmctl.data.sources import expand_sources

    options, executor_settings = corpus_options(context.params)
    if executor is not None:
        from llmctl.errors import require_extra

        require_extra("datatrove", "distributed", "corpus build --executor")
        from llmctl.data.datatrove_stages import build_corpus_distributed
        from llmctl.data.executors import EngineSettings

        engine = EngineSettings(executor, tasks, workers or os.cpu_count() or 1, executor_settings)
        manifest = build_corpus_distributed(sources, out, options, engine, overwrite=overwrite)
    else:
        from llmctl.commands.progress import byte_progress

        total = sum(path.stat().st_size for path in expand_sources(sources)[0])
        with byte_progress("corpus build", total) as advance:
            manifest = build_corpus(sources, out, options, on_progress=advance, overwrite=overwrite)
    print_build_summary(out, manifest)


def corpus_options(flags: dict):
    """`corpus build`'s flags (Click's parameter dict) as CorpusOptions: the recipe's [data] filters and
    cleaning rules, with the filter thresholds given on the command line over them; and its executor settings."""
    from llmctl.data.clean import CleaningRules
    from llmctl.data.corpus import CorpusOptions
    from llmctl.data.filters import FilterRules

    filters, cleaning, executor_settings = FilterRules(), CleaningRules(), {}
    if flags["recipe"]:
        from llmctl.recipe import load_recipe

        data = load_recipe(flags["recipe"]).data
        filters, cleaning, executor_settings = data.filters, data.cleaning, data.executor_settings
    given = {name: flags[name] for name in THRESHOLDS if flags[name] is not None}
    options = CorpusOptions(
        filters=validated_filters(filters, given),
        cleaning=cleaning,
        text_field=flags["text_field"],
        html=flags["html"],
        scrub_pii=flags["scrub_pii"],
        exact_dedup=flags["exact_dedup"],
        near_dup_threshold=flags["near_dup_threshold"] if flags["near_dedup"] else None,
        val_fraction=flags["val_fraction"],
        seed=flags["seed"],
        strict=flags["strict"],
        workers=flags["workers"],
        max_document_bytes=flags["max_document_bytes"],
    )
    return options, executor_settings


def validated_filters(base, overrides: dict):
    """The recipe's filter rules with the command line's thresholds applied; a bad value is one line."""
    from pydantic import ValidationError

    from llmctl.data.filters import FilterRules
    from llmctl.errors import UserError

    try:
        return FilterRules.model_validate({**base.model_dump(), **overrides})
    except ValidationError as error:
        problem = error.errors()[0]
        option = "--" + str(problem["loc"][0]).replace("_", "-")
        raise UserError(f"{option} {problem['input']!r}: {problem['msg'].lower()}") from None


@app.command()
def stats(
    corpus: Path = typer.Argument(..., help="A corpus directory made by `llmctl corpus build`."),
) -> None:
    """Documents, characters, words, length histogram, top sources and what each filter removed."""
    from llmctl.commands.corpus_report import print_stats

    print_stats(corpus)


@app.command()
def instructions(
    corpus: Path = typer.Argument(..., help="A corpus directory made by `llmctl corpus build`."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="The JSONL file of prompt/completion examples to write."
    ),
    split: str = typer.Option("train", help="Which split to draw from (keep val for evaluation)."),
    limit: int | None = typer.Option(None, min=1, help="At most this many examples (a seeded sample)."),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """A starter instruction set from your documents: "Explain: HEADING" -> the section's first paragraph."""
    from llmctl.data.instructions import write_starter_set

    count = write_starter_set(corpus, out, split, limit, seed, overwrite)
    typer.echo(f"wrote {count:,} examples to {out}")


@app.command()
def plan(
    tokens: float = typer.Option(..., "--tokens", min=1, help="Training tokens to plan for, e.g. 105e9."),
    corpus: Path = typer.Option(..., help="A corpus built on this machine: its build rate and kept share."),
    tokens_dir: Path = typer.Option(
        ..., "--tokens-dir", help="Its `tokenize encode` output: encode rate and bytes per token."
    ),
    nodes: int = typer.Option(1, min=1, help="Nodes like this one sharing the build and the encode."),
    vocab_size: int | None = typer.Option(
        None, help="The run's vocabulary (token file width); default: measured."
    ),
) -> None:
    """Raw text, build and encode hours per node, and disk for a token budget, at the measured rates."""
    from rich.console import Console

    from llmctl.data.plan import plan_corpus

    result = plan_corpus(tokens, corpus, tokens_dir, nodes, vocab_size)
    table = plan_table(result, tokens, nodes)
    console = Console()
    console.print(table)
    console.print(
        f"Rates come from {corpus} ({result.measured_on_mb:.1f} MB of input) and {tokens_dir}; they scale with "
        "nodes only while storage keeps up, and a small measuring build under-states them (start-up time).",
        markup=False,
        highlight=False,
    )


def _bytes(count: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,.0f} B"


def plan_table(result, tokens: float, nodes: int):
    """`corpus plan`'s estimates, each beside the measurement it comes from."""
    from rich.table import Table

    table = Table(title=f"data for {tokens:,.0f} tokens on {nodes} node{'s' * (nodes > 1)}")
    table.add_column("")
    table.add_column("estimate", justify="right")
    table.add_column("from", justify="left")
    rows = [
        (
            "raw text needed",
            _bytes(result.raw_text_bytes),
            f"{result.kept_share:.1%} of input kept by the build",
        ),
        ("text kept", _bytes(result.kept_text_bytes), f"{result.bytes_per_token:.2f} bytes per token"),
        (
            "corpus build",
            f"{result.build_hours_per_node:,.1f} h per node",
            f"{result.build_mb_per_second:.2f} MB/s measured",
        ),
        (
            "tokenize encode",
            f"{result.encode_hours_per_node:,.1f} h per node",
            f"{result.encode_mb_per_second:.2f} MB/s measured",
        ),
        (
            "disk: corpus",
            _bytes(result.corpus_disk_bytes),
            f"JSONL is {result.corpus_overhead:.3f}x its text",
        ),
        ("disk: token files", _bytes(result.token_disk_bytes), f"{result.token_bytes} bytes per token"),
    ]
    for row in rows:
        table.add_row(*row)
    return table
