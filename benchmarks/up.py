"""`llmctl up` against a plain Hugging Face script at equal wall-clock time, in one run: llmctl's whole pipeline
(corpus, tokenizer, sizing, training, evaluation, int8, card, registry, report) within `--budget`, against the
plain script of `benchmarks.quality` (sentencepiece defaults, HF LlamaForCausalLM d384 x 6, AdamW at its best
lr and warmup) given the same minutes for its training loop alone, its tokenizer and data not counted.

Both are scored in bits per byte on the corpus's validation split: llmctl's served model (int8 when `up`
kept it) on the text, the plain model on the bytes its lossy tokenizer keeps (as `benchmarks.quality` does).

    .venv/bin/python -m benchmarks.up [--budget 20m] [--corpus ../shared/data/techdocs]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from benchmarks.quality import (
    PLAIN_LR,
    PLAIN_WARMUP,
    capped,
    plain_document_nll,
    prepare_plain,
    read_jsonl_texts,
    train_plain,
    utf8_bytes,
)
from llmctl.evaluate.perplexity import perplexity
from llmctl.infer.decode import load_for_inference
from llmctl.pipeline.budget import parse_duration

REPO = Path(__file__).resolve().parent.parent


def run_up(work: Path, corpus: Path, budget: str) -> float:
    """`llmctl up` on a folder holding the corpus's training documents; its wall-clock seconds."""
    docs = work / "docs"
    docs.mkdir()
    shutil.copy(corpus / "train.jsonl", docs / "train.jsonl")
    environment = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "llmctl", "up", str(docs), "--out", str(work / "up"), "--budget", budget]
    subprocess.run(command, cwd=REPO, env=environment, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "techdocs")
    parser.add_argument("--budget", default="20m")
    args = parser.parse_args()
    minutes = parse_duration(args.budget) / 60
    work = Path(tempfile.mkdtemp())
    val = capped(read_jsonl_texts(args.corpus / "val.jsonl"))
    up_seconds = run_up(work, args.corpus, args.budget)
    model, tokenizer = load_for_inference(work / "up" / "model")
    ours = perplexity(model, tokenizer, val).bits_per_byte

    print(f"plain script: its tokenizer, then {minutes:g} minutes of training ...", flush=True)
    sp, stream = prepare_plain(work, args.corpus)
    settings = argparse.Namespace(
        minutes=minutes, steps=10**9, batch=8, plain_lr=PLAIN_LR, plain_warmup=PLAIN_WARMUP
    )
    started = time.perf_counter()
    plain_model, plain_steps = train_plain(sp, stream, settings, seed=0)
    plain_seconds = time.perf_counter() - started
    kept = [sp.decode(sp.encode(text)) for text in val]
    kept_bytes = sum(map(utf8_bytes, kept))
    plain = sum(plain_document_nll(plain_model, sp, text) for text in val) / math.log(2) / kept_bytes

    print(f"machine: {machine()}")
    print(f"held-out: {args.corpus.name} val, {sum(map(utf8_bytes, val)):,} bytes ({len(val)} documents)")
    print(f"{'':44}{'wall clock':>12}{'bits per byte':>15}")
    print(f"{'llmctl up, everything included':44}{up_seconds / 60:>10.1f} m{ours:>15.4f}")
    print(
        f"{f'plain HF script, training alone ({plain_steps} steps)':44}{plain_seconds / 60:>10.1f} m{plain:>15.4f}"
    )
    print(f"llmctl up vs plain: {100 * (ours / plain - 1):+.1f}% bits per byte (negative: llmctl better)")


if __name__ == "__main__":
    main()
