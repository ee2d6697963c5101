"""Rich tables for `llmctl corpus`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmctl.data.corpus import SPLITS, iter_texts, read_manifest

console = Console()
LENGTH_BINS = [0, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000]


def print_build_summary(out: Path, manifest: dict) -> None:
    splits = manifest["splits"]
    console.print(
        f"corpus {out}: {manifest['documents_read']} documents read, "
        f"{splits['train']['documents']} train / {splits['val']['documents']} val kept, "
        f"{sum(manifest['filtered'].values())} filtered, {manifest['exact_duplicates']} exact and "
        f"{manifest['near_duplicates']} near duplicates, {manifest['skipped_inputs']} unreadable inputs skipped, "
        f"{manifest['mb_per_second']:.2f} MB/s",
        highlight=False,
    )
    for problem in manifest["problems"][:10]:
        console.print(f"  skipped {problem['location']}: {problem['reason']}", highlight=False, markup=False)
    if manifest["pii_replaced"]:
        replaced = ", ".join(f"{kind} {count}" for kind, count in sorted(manifest["pii_replaced"].items()))
        console.print(f"  PII replaced: {replaced}", highlight=False)


def print_stats(corpus: Path) -> None:
    manifest = read_manifest(corpus)
    table = Table(title=f"corpus {corpus}")
    for column in ("split", "documents", "characters", "words", "mean chars/doc"):
        table.add_column(column, justify="right")
    histogram = {split: [0] * len(LENGTH_BINS) for split in SPLITS}
    for split in SPLITS:
        words = documents = characters = 0
        for text in iter_texts(corpus, split):
            documents += 1
            characters += len(text)
            words += len(text.split())
            bucket = sum(len(text) >= edge for edge in LENGTH_BINS) - 1
            histogram[split][bucket] += 1
        table.add_row(
            split, f"{documents:,}", f"{characters:,}", f"{words:,}", f"{characters / max(documents, 1):,.0f}"
        )
    console.print(table)

    lengths = Table(title="document length (characters)")
    lengths.add_column("range")
    for split in SPLITS:
        lengths.add_column(split, justify="right")
    edges = [*LENGTH_BINS, None]
    for index in range(len(LENGTH_BINS)):
        low, high = edges[index], edges[index + 1]
        label = f"{low:,}-{high:,}" if high else f"{low:,}+"
        lengths.add_row(label, *(str(histogram[split][index]) for split in SPLITS))
    console.print(lengths)

    print_manifest_tables(manifest)


def print_manifest_tables(manifest: dict) -> None:
    """What the build changed and removed, and where the documents came from."""
    cleaned = Table(title="cleaning: characters changed per rule (recipe section data.cleaning)")
    cleaned.add_column("rule")
    cleaned.add_column("characters", justify="right")
    for rule, count in manifest.get("characters_cleaned", {}).items():
        cleaned.add_row(rule, f"{count:,}")
    console.print(cleaned)

    removed = Table(title="removed")
    removed.add_column("reason")
    removed.add_column("documents", justify="right")
    for reason, count in sorted(manifest["filtered"].items()):
        removed.add_row(f"filter: {reason}", str(count))
    removed.add_row("exact duplicates", str(manifest["exact_duplicates"]))
    removed.add_row("near duplicates", str(manifest["near_duplicates"]))
    removed.add_row("unreadable inputs", str(manifest["skipped_inputs"]))
    console.print(removed)

    sources = Table(title="top sources")
    sources.add_column("source")
    sources.add_column("documents", justify="right")
    for source, count in manifest["top_sources"].items():
        sources.add_row(source, str(count))
    console.print(sources)
