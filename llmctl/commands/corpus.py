"""`llmctl corpus build|stats|plan`: turn a folder of documents into a clean, deduplicated train/val corpus,
and size the data for a token budget."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from llmctl.data.compression import DOCUMENT_BYTES

app = typer.Typer(add_completion=False, help="Build and inspect training corpora.", no_args_is_help=True)


@app.command()
def build(
    sources: list[str] = typer.Argument(..., help="Files, folders or quoted globs of .txt/.md/.jsonl/.html."),
    out: Path = typer.Option(..., "--out", "-o", help="Output corpus directory (written atomically)."),
    recipe: Path | None = typer.Option(
        None,
        help="Take filter thresholds, cleaning rules and executor settings from this recipe's [data] section.",
    ),
    text_field: str = typer.Option("text", help="JSONL field, or Parquet/CSV column, holding the text."),
    html: str = typer.Option(
        "main", help="HTML: main (the main content, trafilatura; the html extra) or all (all visible text)."
    ),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="Replace e-mails, phones, IPs, card numbers."),
    exact_dedup: bool = typer.Option(True, "--exact-dedup/--no-exact-dedup"),
    near_dedup: bool = typer.Option(
        True, "--near-dedup/--no-near-dedup", help="MinHash LSH near-duplicates."
    ),
    near_dup_threshold: float = typer.Option(0.8, min=0.05, max=1.0, help="Jaccard similarity that counts."),
    val_fraction: float = typer.Option(0.05, min=0.0, max=0.9, help="Share of documents held out."),
    seed: int = typer.Option(0, help="Seed of the train/val split."),
    min_chars: int | None = typer.Option(None, help="Filter: minimum characters."),
    max_chars: int | None = typer.Option(None, help="Filter: maximum characters."),
    min_alpha_fraction: float | None = typer.Option(None, help="Filter: minimum share of letters."),
    max_repeated_line_fraction: float | None = typer.Option(
        None, help="Filter: maximum share of repeated lines."
    ),
    max_repeated_ngram_fraction: float | None = typer.Option(None, help="Filter: maximum repeated 5-grams."),
    language: str | None = typer.Option(
        None, help="Filter: keep only this language (ISO code; needs py3langid)."
    ),
    max_document_bytes: int = typer.Option(
        DOCUMENT_BYTES,
        min=1,
        help="Skip a document (a file, a JSONL line, a DOCX's parts) that grows past this many bytes as it is "
        "decompressed or extracted; memory stays bounded by it.",
    ),
    strict: bool = typer.Option(False, help="Stop at the first unreadable file or malformed line."),
    workers: int = typer.Option(
        0, min=0, help="Worker processes, or with --executor tasks at once (0: one per core)."
    ),
    executor: str | None = typer.Option(
        None,
        help="Run as datatrove stages: local, ray or slurm (the distributed extra); default: embedded.",
    ),
    tasks: int = typer.Option(2, min=1, help="With --executor: input shards of the per-document stages."),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Clean, filter, scrub, deduplicate and split documents into JSONL shards with a manifest."""
    from llmctl.commands.corpus_report import print_build_summary
    from llmctl.commands.progress import byte_progress
    from llmctl.data.clean import CleaningRules
    from llmctl.data.corpus import CorpusOptions, build_corpus
    from llmctl.data.filters import FilterRules
    from llmctl.data.sources import expand_sources

    filters, cleaning, executor_settings = FilterRules(), CleaningRules(), {}
    if recipe:
        from llmctl.recipe import load_recipe

        data = load_recipe(recipe).data
        filters, cleaning, executor_settings = data.filters, data.cleaning, data.executor_settings
    thresholds = {
        "min_chars": min_chars,
        "max_chars": max_chars,
        "min_alpha_fraction": min_alpha_fraction,
        "max_repeated_line_fraction": max_repeated_line_fraction,
        "max_repeated_ngram_fraction": max_repeated_ngram_fraction,
        "language": language,
    }
    filters = validated_filters(filters, {k: v for k, v in thresholds.items() if v is not None})
    options = CorpusOptions(
        filters=filters,
        cleaning=cleaning,
        text_field=text_field,
        html=html,
        scrub_pii=scrub_pii,
        exact_dedup=exact_dedup,
        near_dup_threshold=near_dup_threshold if near_dedup else None,
        val_fraction=val_fraction,
        seed=seed,
        strict=strict,
        workers=workers,
        max_document_bytes=max_document_bytes,
    )
    if executor is not None:
        from llmctl.errors import require_extra

        require_extra("datatrove", "distributed", "corpus build --executor")
        from llmctl.data.datatrove_stages import build_corpus_distributed
        from llmctl.data.executors import EngineSettings

        engine = EngineSettings(executor, tasks, workers or os.cpu_count() or 1, executor_settings)
        manifest = build_corpus_distributed(sources, out, options, engine, overwrite=overwrite)
    else:
        total = sum(path.stat().st_size for path in expand_sources(sources)[0])
        with byte_progress("corpus build", total) as advance:
            manifest = build_corpus(sources, out, options, on_progress=advance, overwrite=overwrite)
    print_build_summary(out, manifest)


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
    from rich.table import Table

    from llmctl.data.plan import plan_corpus

    result = plan_corpus(tokens, corpus, tokens_dir, nodes, vocab_size)
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
