"""Data pipeline throughput on the techdocs corpus: corpus build (with MinHash dedup), tokenizer training,
end-to-end `tokenize encode`, and raw sentencepiece encoding side by side with Hugging Face `tokenizers`
(a BPE of the same vocabulary size trained on the same text), in one run.

    .venv/bin/python -m benchmarks.data_throughput [--corpus ../shared/data/techdocs] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from llmctl.data.corpus import CorpusOptions, build_corpus, iter_texts
from llmctl.data.token_files import encode_corpus
from llmctl.data.tokenizer import open_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent


def hf_bpe(texts: list[str], vocab: int):
    """The peer: HF tokenizers' BPE with a Metaspace pre-tokenizer (sentencepiece-style), byte fallback."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "data" / "techdocs")
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    if not args.corpus.is_dir():
        args.corpus = REPO / "data" / "sample"
        print(f"techdocs not found; using {args.corpus}")
    sources = [str(args.corpus / "train.jsonl"), str(args.corpus / "val.jsonl")]
    work = Path(tempfile.mkdtemp())

    manifest = build_corpus(sources, work / "corpus", CorpusOptions())
    started = time.perf_counter()
    train_tokenizer(work / "corpus", work / "tokenizer", args.vocab)
    tokenizer_seconds = time.perf_counter() - started
    meta = encode_corpus(work / "corpus", work / "tokenizer" / "tokenizer.model", work / "tokens")

    texts = list(iter_texts(work / "corpus", "train"))
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    sp = open_tokenizer(work / "tokenizer" / "tokenizer.model")
    started = time.perf_counter()
    sp.encode_batch(texts)
    sp_rate = megabytes / (time.perf_counter() - started)

    started = time.perf_counter()
    hf = hf_bpe(texts, args.vocab)
    hf_train_seconds = time.perf_counter() - started
    os.environ.setdefault("RAYON_NUM_THREADS", str(os.cpu_count()))
    started = time.perf_counter()
    hf.encode_batch(texts)
    hf_rate = megabytes / (time.perf_counter() - started)

    print(f"machine: {machine()}; corpus {args.corpus} ({manifest['input_bytes'] / 1e6:.1f} MB in)")
    print(f"corpus build (clean, filters, exact + MinHash dedup): {manifest['mb_per_second']:.2f} MB/s")
    print(
        f"tokenize train, sentencepiece BPE {args.vocab}: {tokenizer_seconds:.1f} s (HF tokenizers BPE: {hf_train_seconds:.1f} s)"
    )
    print(f"tokenize encode end to end (JSONL -> uint16 file): {meta['mb_per_second']:.2f} MB/s")
    print(
        f"raw encode, {megabytes:.1f} MB: sentencepiece {sp_rate:.2f} MB/s, HF tokenizers {hf_rate:.2f} MB/s, ratio {sp_rate / hf_rate:.2f}x"
    )
    print(
        json.dumps(
            {
                "corpus_mb_s": manifest["mb_per_second"],
                "encode_mb_s": meta["mb_per_second"],
                "sp_mb_s": sp_rate,
                "hf_mb_s": hf_rate,
            }
        )
    )


if __name__ == "__main__":
    main()
