"""lm-eval speed in one run: the same multiple-choice task (the domain suite's 200-item cloze, built from the
bundled sample) on the same checkpoint through llmctl's adapter (`--model llmctl`) and lm-eval's own `hf`
model, both at `--batch_size 8`; prints the time of each, their ratio, the accuracies and the largest
difference between the two models' per-request log-likelihoods.

    .venv/bin/python -m benchmarks.eval_speed [--limit 200] [--batch-size 8]

The checkpoint is the 16.8M shape (d384 x 6, vocab 8000) with random weights: speed and agreement do not
depend on training.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from llmctl.checkpoint import save_checkpoint
from llmctl.data.corpus import CorpusOptions, build_corpus
from llmctl.data.tokenizer import open_tokenizer, train_tokenizer
from llmctl.evaluate.suite import build_domain_suite
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample"
SHAPE = ModelConfig(vocab_size=8000, d_model=384, n_layer=6, n_head=6, max_seq_len=1024)


def main() -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llmctl.evaluate.lm_eval_adapter  # noqa: F401  (registers the model type)

    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    sources = [str(SAMPLE / "train.jsonl"), str(SAMPLE / "val.jsonl")]
    build_corpus(sources, work / "corpus", CorpusOptions(val_fraction=0.1))
    train_tokenizer(work / "corpus", work / "tokenizer", SHAPE.vocab_size)
    suite = build_domain_suite(work / "corpus", work / "suite", cloze=args.limit)
    torch.manual_seed(0)
    tokenizer = open_tokenizer(work / "tokenizer" / "tokenizer.model")
    checkpoint = save_checkpoint(
        work / "ckpt", SHAPE, export_state_dict(Transformer(SHAPE)), tokenizer=tokenizer
    )
    manager = TaskManager(include_path=str(suite.parent), include_defaults=False)

    results, seconds = {}, {}
    for name in ("llmctl", "hf"):
        started = time.perf_counter()
        results[name] = lm_eval.simple_evaluate(
            model=name,
            model_args=f"pretrained={checkpoint}" + (",dtype=float32" if name == "hf" else ""),
            tasks=["domain_cloze"],
            task_manager=manager,
            limit=args.limit,
            batch_size=args.batch_size,
            log_samples=True,
            device="cpu",
        )
        seconds[name] = time.perf_counter() - started

    def scores(name: str) -> list[float]:
        return [float(r[0]) for s in results[name]["samples"]["domain_cloze"] for r in s["filtered_resps"]]

    gap = max(abs(a - b) for a, b in zip(scores("llmctl"), scores("hf"), strict=True))
    print(f"machine: {machine()}")
    print(
        f"task: domain_cloze, {args.limit} items, {len(scores('llmctl'))} log-likelihood requests, batch size {args.batch_size}"
    )
    for name in ("llmctl", "hf"):
        accuracy = results[name]["results"]["domain_cloze"]["acc,none"]
        print(f"{name:8} {seconds[name]:7.1f} s   accuracy {accuracy:.3f}")
    print(f"llmctl / hf speed: {seconds['hf'] / seconds['llmctl']:.2f}x (target >= 1x)")
    print(f"largest per-request log-likelihood difference: {gap:.2e} (target <= 1e-4)")


if __name__ == "__main__":
    main()
