"""`llmctl up`'s stages after training: held-out evaluation, int8 when it pays, the delivered model directory
with its card, the registry version and the report. Each returns what the ledger records of it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llmctl.atomic import atomic_write_text
from llmctl.data.corpus import iter_texts
from llmctl.digests import write_digest_manifest

CARD_FILE = "README.md"
HELDOUT_DOCUMENTS = 200  # quantization's perplexity check
MAX_QUANTIZATION_COST = 0.01  # int8 is served when faster and at most 1% worse in held-out perplexity


def evaluate_checkpoint(checkpoint: Path, corpus: Path, out: Path) -> dict:
    """`llmctl eval CKPT --data CORPUS --out OUT`: held-out perplexity and bits per byte."""
    from llmctl.evaluate.runner import Evaluator

    record = Evaluator(checkpoint).evaluate(data=corpus)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    numbers = record["results"]["perplexity"]
    kept = {key: numbers[key] for key in ("token_perplexity", "bits_per_byte", "documents", "tokens")}
    summary = f"perplexity {kept['token_perplexity']:.3f}, {kept['bits_per_byte']:.4f} bits per byte"
    return {**kept, "file": str(out), "summary": summary}


def quantize_if_faster(model: Path, corpus: Path, out: Path) -> dict:
    """int8 at `out`, kept when it decodes faster at no more than MAX_QUANTIZATION_COST more perplexity on
    the held-out split; removed otherwise."""
    from llmctl.compress.run import quantize_checkpoint
    from llmctl.quantization.quantize import QuantizationSettings

    heldout = list(iter_texts(corpus, "val"))[:HELDOUT_DOCUMENTS]
    source, int8 = quantize_checkpoint(model, out, QuantizationSettings("int8"), heldout)
    cost = int8.change_against(source) or 0.0
    before, after = source.decode_tokens_per_second or 0.0, int8.decode_tokens_per_second or 0.0
    kept = after > before and cost <= MAX_QUANTIZATION_COST
    if not kept:
        shutil.rmtree(out, ignore_errors=True)
    verdict = "kept" if kept else "not kept"
    return {
        "kept": kept,
        "summary": f"int8 {verdict}: perplexity {cost:+.2%}, decode {before:.0f} -> {after:.0f} tokens/s",
    }


def deliver_model(served: Path, out: Path, card: str) -> dict:
    """`out`: the served checkpoint's files (hard links where the disk allows), its model card, and a
    digest manifest covering both; replaced whole."""
    staging = out.parent / f".{out.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    skip = shutil.ignore_patterns("trainer_state.pt", CARD_FILE)
    shutil.copytree(served, staging, copy_function=_link_or_copy, ignore=skip)
    (staging / CARD_FILE).write_text(card, encoding="utf-8")
    write_digest_manifest(staging)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return {"summary": f"{out}, with its model card"}


def register_model(model: Path, name: str, note: str, evaluation: Path) -> dict:
    """A new registry version of `name` with its lineage, and the held-out evaluation attached (measured on
    the float weights when the served ones are int8)."""
    from llmctl.registry.store import ModelRegistry

    registry = ModelRegistry()
    version = registry.register(model, name, note=note)
    results = json.loads(evaluation.read_text())
    registry.attach(version.reference, results, evaluation, "heldout", force=True)
    return {"reference": version.reference, "summary": version.reference}


def write_run_report(runs: list[Path], out: Path) -> dict:
    from llmctl.train.run_report import write_report

    page = write_report(runs, out, [], overwrite=True)
    return {"page": str(page), "summary": str(page)}


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
