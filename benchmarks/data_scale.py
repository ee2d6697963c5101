"""Corpus build at scale: the embedded build against the datatrove build (local executor, 1 and 2 workers;
Ray, 2 workers; local, 2 workers, on the same bytes as one file) on N copies of the techdocs corpus, each copy perturbed (a word changed per paragraph, so the copies are
near duplicates, not exact ones), with the peak memory of the largest process; `tokenize encode` as one file
and per shard; and the projected hours for 400 GB on N nodes from those rates.

Each configuration runs in a fresh process, so its peak resident memory is its own.

    .venv/bin/python -m benchmarks.data_scale [--copies 10] [--nodes 1 8 64] [--builds embedded ray2 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, run_fresh

REPO = Path(__file__).resolve().parent.parent
TECHDOCS = REPO.parent / "shared" / "data" / "techdocs"
TARGET_BYTES = 400e9


def perturbed_copies(corpus: Path, copies: int, out: Path) -> list[str]:
    """The corpus once as it is and `copies - 1` more times with one word per paragraph changed."""
    files = []
    lines = (corpus / "train.jsonl").read_text().splitlines() + (
        corpus / "val.jsonl"
    ).read_text().splitlines()
    for copy in range(copies):
        rng = random.Random(copy)
        path = out / f"copy-{copy:02d}.jsonl"
        with path.open("w") as sink:
            for line in lines:
                record = json.loads(line)
                if copy:
                    paragraphs = record["text"].split("\n\n")
                    for index, paragraph in enumerate(paragraphs):
                        words = paragraph.split(" ")
                        words[rng.randrange(len(words))] = f"w{rng.randrange(10**6)}"
                        paragraphs[index] = " ".join(words)
                    record["text"] = "\n\n".join(paragraphs)
                    record["id"] = f"{record.get('id', '')}-copy{copy}"
                sink.write(json.dumps(record) + "\n")
        files.append(str(path))
    return files


BUILDS = {  # name: (label, executor, workers, one file)
    "embedded": ("embedded, 2 workers", "embedded", 2, False),
    "local1": ("datatrove local, 1 worker", "local", 1, False),
    "local2": ("datatrove local, 2 workers", "local", 2, False),
    "ray2": ("datatrove ray, 2 workers", "ray", 2, False),
    "onefile": ("local, 2 workers, one file", "local", 2, True),
}


def run_build(sources: list[str], out: Path, executor: str | None, workers: int) -> dict:
    """One build in this (fresh) process; its rate, decisions and peak memory of self and children."""
    from llmctl.data.corpus import CorpusOptions, build_corpus

    options = CorpusOptions(workers=workers)
    started = time.perf_counter()
    if executor is None:
        manifest = build_corpus(sources, out, options)
    else:
        from llmctl.data.datatrove_stages import build_corpus_distributed
        from llmctl.data.executors import EngineSettings

        manifest = build_corpus_distributed(
            sources, out, options, EngineSettings(executor, max(len(sources), 2 * workers), workers)
        )
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "mb_per_second": manifest["input_bytes"] / 1e6 / seconds,
        "input_mb": manifest["input_bytes"] / 1e6,
        "kept": sum(split["documents"] for split in manifest["splits"].values()),
        "exact_duplicates": manifest["exact_duplicates"],
        "near_duplicates": manifest["near_duplicates"],
        "peak_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_child_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def run_encode(corpus: Path, out: Path, per_shard: bool) -> dict:
    from llmctl.data.token_files import encode_corpus
    from llmctl.data.tokenizer import train_tokenizer

    tokenizer = out.parent / "tokenizer"
    if not (tokenizer / "tokenizer.model").is_file():
        train_tokenizer(corpus, tokenizer, 8000)
    meta = encode_corpus(corpus, tokenizer / "tokenizer.model", out, per_shard=per_shard)
    return {"mb_per_second": meta["mb_per_second"], "tokens": sum(meta["tokens"].values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--builds", nargs="+", choices=list(BUILDS), default=list(BUILDS))
    parser.add_argument("--no-encode", action="store_true", help="Only the builds.")
    parser.add_argument("--run", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        function, *rest = args.run
        if function == "build":
            out, executor, workers, *sources = rest
            print(
                json.dumps(
                    run_build(sources, Path(out), None if executor == "embedded" else executor, int(workers))
                )
            )
        else:
            corpus, out, per_shard = rest
            print(json.dumps(run_encode(Path(corpus), Path(out), per_shard == "1")))
        return

    work = Path(tempfile.mkdtemp())
    sources = perturbed_copies(TECHDOCS, args.copies, work)
    print(machine())
    print(
        f"input: techdocs x {args.copies} ({sum(Path(s).stat().st_size for s in sources) / 1e6:,.0f} MB, copies perturbed)"
    )
    results = {}
    for name in args.builds:
        label, executor, workers, one_file = BUILDS[name]
        inputs = sources
        if one_file:  # the same bytes as one JSONL file: shared between tasks in spans
            inputs = [str(work / "all.jsonl")]
            with open(inputs[0], "wb") as sink:
                for source in sources:
                    sink.write(Path(source).read_bytes())
        results[name] = r = run_fresh(
            "benchmarks.data_scale", "build", str(work / name), executor, str(workers), *inputs
        )
        worker_peak = "n/a (Ray's processes)" if executor == "ray" else f"{r['peak_child_mb']:6.0f} MB"
        print(
            f"{label:28s} {r['mb_per_second']:6.2f} MB/s  {r['seconds']:7.1f} s  kept {r['kept']:6d}  exact {r['exact_duplicates']:5d}  "
            f"near {r['near_duplicates']:6d}  peak memory: main {r['peak_self_mb']:6.0f} MB, largest worker {worker_peak}"
        )
    if args.no_encode or not {"embedded", "local2"} <= results.keys():
        return
    corpus = work / "embedded"
    for per_shard in (False, True):
        encoded = run_fresh(
            "benchmarks.data_scale",
            "encode",
            str(corpus),
            str(work / f"tokens-{int(per_shard)}"),
            str(int(per_shard)),
        )
        print(
            f"tokenize encode {'per shard' if per_shard else 'one file '}  {encoded['mb_per_second']:6.2f} MB/s  {encoded['tokens']:,} tokens"
        )
        results[f"encode per_shard={per_shard}"] = encoded
    build_rate = results["local2"]["mb_per_second"]
    encode_rate = results["encode per_shard=True"]["mb_per_second"]
    for nodes in args.nodes:
        hours = TARGET_BYTES / 1e6 / (build_rate * nodes) / 3600
        encode_hours = TARGET_BYTES / 1e6 / (encode_rate * nodes) / 3600
        print(
            f"400 GB on {nodes:3d} nodes like this one: build {hours:8.1f} h, encode {encode_hours:7.1f} h (linear in nodes)"
        )


if __name__ == "__main__":
    main()
