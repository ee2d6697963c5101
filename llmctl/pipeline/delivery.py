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
HELDOUT_TOKENS = 125_000  # about 500 KB of the held-out split: evaluation stays bounded on a large corpus
QUANTIZATION_TOKENS = 25_000  # of those, what int8's perplexity cost is measured on
EVAL_WINDOW = 1024  # positions per scored window, whatever the model's context (a base's may be 8k+)
MAX_QUANTIZATION_COST = 0.01  # int8 is served when faster and at most 1% worse in held-out perplexity


def write_heldout(corpus: Path, out: Path) -> int:
    """The evaluation set: the leading held-out documents up to HELDOUT_TOKENS, as JSONL; its count."""
    from llmctl.compress.measure import heldout_texts

    texts = heldout_texts(list(iter_texts(corpus, "val")), HELDOUT_TOKENS)
    atomic_write_text(out, "".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts))
    return len(texts)


def evaluate_checkpoint(checkpoint: Path, heldout: Path, out: Path) -> dict:
    """`llmctl eval CKPT --data HELDOUT --window W --out OUT`: perplexity and bits per byte."""
    from llmctl.evaluate.runner import Evaluator

    evaluator = Evaluator(checkpoint)
    window = min(EVAL_WINDOW, evaluator.model.config.max_seq_len)
    record = evaluator.evaluate(data=heldout, window=window)
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    numbers = record["results"]["perplexity"]
    kept = {key: numbers[key] for key in ("token_perplexity", "bits_per_byte", "documents", "tokens")}
    summary = f"perplexity {kept['token_perplexity']:.3f}, {kept['bits_per_byte']:.4f} bits per byte"
    return {**kept, "file": str(out), "summary": summary}


def quantize_if_faster(model: Path, heldout: Path, out: Path) -> dict:
    """int8 at `out`, kept when it decodes faster at no more than MAX_QUANTIZATION_COST more perplexity;
    removed otherwise. Both are measured as `llmctl quantize` measures them, on part of the held-out set."""
    from llmctl.compress.measure import heldout_texts
    from llmctl.compress.run import write_quantized
    from llmctl.quantization.quantize import QuantizationSettings

    write_quantized(model, out, QuantizationSettings("int8"))
    texts = heldout_texts([record["text"] for record in map(json.loads, heldout.open())], QUANTIZATION_TOKENS)
    (float_perplexity, before), (int8_perplexity, after) = (_measure(path, texts) for path in (model, out))
    cost = int8_perplexity / float_perplexity - 1
    kept = after > before and cost <= MAX_QUANTIZATION_COST
    if not kept:
        shutil.rmtree(out, ignore_errors=True)
    verdict = "kept" if kept else "not kept"
    return {
        "kept": kept,
        "summary": f"int8 {verdict}: perplexity {cost:+.2%}, decode {before:.0f} -> {after:.0f} tokens/s",
    }


def _measure(checkpoint: Path, texts: list[str]) -> tuple[float, float]:
    """Held-out perplexity and batch-1 decode tokens/s of a checkpoint loaded as chat and serve load it."""
    from llmctl.compress.measure import decode_tokens_per_second
    from llmctl.evaluate.perplexity import perplexity
    from llmctl.infer.decode import load_for_inference

    model, tokenizer = load_for_inference(checkpoint)
    window = min(EVAL_WINDOW, model.config.max_seq_len)
    return perplexity(model, tokenizer, texts, window).token_perplexity, decode_tokens_per_second(model)


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
