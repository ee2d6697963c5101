"""`llmctl tokenize train|encode|show`: a sentencepiece tokenizer and memory-mapped token files."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Literal

import typer

app = typer.Typer(
    add_completion=False, help="Train a tokenizer and encode a corpus into token files.", no_args_is_help=True
)


@app.command()
def train(
    corpus: Path = typer.Argument(..., help="A corpus directory made by `llmctl corpus build`."),
    vocab: int = typer.Option(32000, "--vocab", min=64, help="Vocabulary size."),
    model_type: Literal["bpe", "unigram"] = typer.Option("bpe", "--type", help="sentencepiece model type."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output directory; default CORPUS/../tokenizer."
    ),
    domain_terms: Path | None = typer.Option(None, help="File of terms to keep whole, one per line."),
    seed: int = typer.Option(0, help="Seed for sampling training sentences."),
    split_digits: bool = typer.Option(
        True, "--split-digits/--no-split-digits", help="Make every digit its own piece."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Train a sentencepiece model (byte fallback, special and chat tokens) and report its fertility."""
    from rich.console import Console

    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.data.tokenizer_base import MODEL_FILE

    out = out or corpus.parent / "tokenizer"
    report = train_tokenizer(
        corpus, out, vocab, model_type, domain_terms, seed, split_digits=split_digits, overwrite=overwrite
    )
    line = f"tokenizer {out / MODEL_FILE}: {report['vocab_size']} pieces, {report['fertility']:.3f} tokens/word on val"
    if "fertility_without_domain_terms" in report:
        line += (
            f" ({report['fertility_without_domain_terms']:.3f} without the {report['domain_terms']} domain terms; "
            f"{report['domain_terms_kept_whole']} kept whole)"
        )
    console = Console()
    console.print(line, highlight=False)
    fallback = report["byte_fallback"]
    if fallback["characters"]:
        examples = " ".join(f"{char!r} ({count:,})" for char, count in fallback["most_frequent"][:10])
        console.print(
            f"{fallback['characters']} characters are no piece and fall back to bytes "
            f"({100 * fallback['share_of_text']:.3f}% of the text): {examples}",
            highlight=False,
            markup=False,
        )


@app.command()
def encode(
    corpus: Path = typer.Argument(..., help="A corpus directory made by `llmctl corpus build`."),
    tokenizer: Path = typer.Option(
        ..., "--tokenizer", "-t", help="A tokenizer.model or tokenizer.json file, or a directory holding one."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory; default CORPUS/../tokens."),
    threads: int = typer.Option(0, min=0, help="Encoding threads (0: all cores)."),
    per_shard: bool = typer.Option(
        False, "--per-shard", help="One token file per corpus shard, read by training as one stream."
    ),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="Encode the shards as datatrove tasks: local, ray or slurm (needs --per-shard, llmctl[distributed]).",
    ),
    recipe: Path | None = typer.Option(None, help="With --executor: the recipe's [data.executor_settings]."),
    tasks: int = typer.Option(
        2, min=1, help="With --executor: encoding tasks (each takes every N-th shard)."
    ),
    overwrite: bool = typer.Option(
        False, help="Replace an existing output directory that is not up to date."
    ),
) -> None:
    """Encode every split into a flat uint16/uint32 token file plus meta.json (a no-op when up to date)."""
    from rich.console import Console

    from llmctl.commands.progress import byte_progress
    from llmctl.data.corpus import read_manifest
    from llmctl.data.token_files import encode_corpus

    out = out or corpus.parent / "tokens"
    shard_writer = datatrove_shard_writer(executor, recipe, tasks) if executor is not None else None
    manifest = read_manifest(corpus)
    total = sum(split["bytes"] for split in manifest["splits"].values())
    with byte_progress("tokenize encode", total) as advance:
        meta = encode_corpus(
            corpus,
            tokenizer,
            out,
            threads,
            on_progress=advance,
            overwrite=overwrite,
            per_shard=per_shard,
            shard_writer=shard_writer,
        )
    state = "up to date" if meta["up_to_date"] else f"{meta['mb_per_second']:.2f} MB/s"
    counts = ", ".join(f"{split} {count:,}" for split, count in meta["tokens"].items())
    Console().print(
        f"tokens {out}: {counts} tokens ({meta['dtype']}), {state}", highlight=False, markup=False
    )


@app.command()
def show(
    model: Path = typer.Argument(
        ..., help="A tokenizer.model or tokenizer.json file, or a directory holding one."
    ),
    text: str = typer.Argument(..., help="Text to tokenize."),
) -> None:
    """Print the pieces and ids of a text, to check how domain terms are split."""
    from rich.console import Console
    from rich.table import Table

    from llmctl.data.tokenizer import open_tokenizer

    tok = open_tokenizer(model)
    ids = tok.encode(text)
    table = Table(title=f"{len(ids)} tokens")
    table.add_column("piece")
    table.add_column("id", justify="right")
    for piece, token_id in zip(tok.pieces(text), ids, strict=True):
        table.add_row(repr(piece), str(token_id))
    Console().print(table)


def datatrove_shard_writer(executor: str, recipe: Path | None, tasks: int):
    """`--executor`: the token files written by datatrove tasks (the recipe's executor settings)."""
    import os

    from llmctl.errors import require_extra

    require_extra("datatrove", "distributed", "tokenize encode --executor")
    from llmctl.data.datatrove_stages import encode_shards_distributed
    from llmctl.data.executors import EngineSettings
    from llmctl.recipe import load_recipe

    settings = load_recipe(recipe).data.executor_settings if recipe else {}
    return partial(
        encode_shards_distributed, engine=EngineSettings(executor, tasks, os.cpu_count() or 1, settings)
    )
