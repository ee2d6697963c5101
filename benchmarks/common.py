"""Shared benchmark helpers: this machine's memory bandwidth, measured in the same run, and fake token files.

The matmul peak that MFU is quoted against is `llmctl.train.metrics.measure_cpu_matmul_peak`, the trainer's own.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def memory_bandwidth(bytes_: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of several sums over a 1 GiB tensor (decode reads every weight
    once per token, so weight bytes / this is the fastest possible time per token)."""
    data = torch.ones(bytes_ // 4)
    data.sum()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return bytes_ / best


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def fake_tokens(directory: Path, vocab: int, n_tokens: int, tokenizer_sha256: str = "") -> None:
    """Random uint16 token files with a meta.json, as `llmctl tokenize encode` writes them (claiming the
    tokenizer with `tokenizer_sha256`, for a run that checks it)."""
    rng = np.random.default_rng(0)
    counts = {"train": n_tokens, "val": max(4096, n_tokens // 100)}
    for split, count in counts.items():
        rng.integers(4, vocab, count, dtype=np.uint16).tofile(Path(directory) / f"{split}.bin")
    meta = {
        "tokens": counts,
        "fingerprint": f"random-{vocab}-{n_tokens}",
        "dtype": "uint16",
        "vocab_size": vocab,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3,
        "tokenizer": "",
        "tokenizer_sha256": tokenizer_sha256,
    }
    (Path(directory) / "meta.json").write_text(json.dumps(meta))


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The training benchmarks' model and batch shape: the 16.8M model at sequence 256, batch 8."""
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)


def timed_run_sections(args: argparse.Namespace, run_dir: Path) -> dict:
    """Recipe sections for a throughput run: warm-up plus timed steps at a constant lr, no evaluation to speak of."""
    return {
        "train": {
            "steps": args.warmup + args.steps,
            "micro_batch_size": args.batch,
            "global_batch_size": args.batch,
            "eval_batches": 1,
        },
        "schedule": {"warmup_steps": 0, "kind": "constant"},
        "checkpoint": {"dir": str(run_dir)},
    }


def shape_config(args: argparse.Namespace):
    """The llmctl `ModelConfig` of `add_shape_arguments`' shape."""
    from llmctl.model import ModelConfig

    return ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        max_seq_len=args.seq,
    )


def sample_tokenizer(work: Path, vocab: int = 8000):
    """A sentencepiece tokenizer trained on the bundled sample corpus (for checkpoints and GGUF exports)."""
    from llmctl.data.corpus import CorpusOptions, build_corpus
    from llmctl.data.tokenizer import open_tokenizer, train_tokenizer

    sample = Path(__file__).resolve().parent.parent / "data" / "sample"
    build_corpus([str(sample / "train.jsonl")], work / "corpus", CorpusOptions())
    train_tokenizer(work / "corpus", work / "tokenizer", vocab)
    return open_tokenizer(work / "tokenizer" / "tokenizer.model")


def run_fresh(module: str, *arguments: str) -> dict:
    """`python -m MODULE --run ARGUMENTS` in a new interpreter (its own peak memory, nothing warm from the
    last run), from the repository root; the JSON object its last line prints."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--run", *arguments],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])
