"""datatrove or Ray Data for the corpus build's per-document stage: the same work (read JSONL, clean,
filter, exact key: llmctl's `process_document`) on the same files and CPUs through each engine, and the
kept documents of both compared. This stage is most of a build's time; deduplication is not compared
because Ray Data has none of its own (the four MinHash stages would be llmctl's to write).

Each engine runs in a fresh process with 2 CPUs; files are techdocs copies, one per task.

    .venv/bin/python -m benchmarks.data_engines [--copies 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

from benchmarks.common import machine, run_fresh

REPO = Path(__file__).resolve().parent.parent
TECHDOCS = REPO.parent / "shared" / "data" / "techdocs"
WORKERS = 2


def with_datatrove(files: list[Path], work: Path) -> dict:
    """llmctl's own process stage (`corpus build --executor local`), one task per file, 2 at once."""
    from llmctl.data.corpus import CorpusOptions
    from llmctl.data.datatrove_stages import process_inputs
    from llmctl.data.executors import EngineSettings, run_stage
    from llmctl.data.spans import input_spans

    spans = input_spans(files, 1 << 40)
    step = partial(process_inputs, spans=spans, options=CorpusOptions(), work=work, directory=Path.cwd())
    started = time.perf_counter()
    run_stage("process", [step], len(files), EngineSettings("local", len(files), WORKERS), work)
    seconds = time.perf_counter() - started
    kept = sum(1 for path in (work / "processed").glob("*.jsonl") for _ in path.open())
    return {"seconds": seconds, "kept": kept}


def with_ray_data(files: list[Path], work: Path) -> dict:
    """The same per-document function as a Ray Data map over the files' rows, on a 2-CPU local Ray."""
    import ray

    ray.init(num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    dataset = ray.data.read_json([str(path) for path in files], lines=True)
    kept = dataset.map_batches(process_rows, batch_format="pyarrow").count()
    seconds = time.perf_counter() - started
    ray.shutdown()
    return {"seconds": seconds, "kept": kept}


def process_rows(batch):
    """A batch of JSONL rows cleaned, filtered and keyed; only the kept rows come back."""
    import pyarrow as pa

    from llmctl.data.corpus import CorpusOptions, process_document
    from llmctl.data.documents import Document

    options = CorpusOptions(near_dup_threshold=None)
    kept = {"id": [], "text": [], "exact": []}
    for row_id, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist(), strict=True):
        processed = process_document(Document(str(row_id), "", text), options)
        if processed.rejected_by is None:
            kept["id"].append(processed.id)
            kept["text"].append(processed.text)
            kept["exact"].append(processed.exact)
    return pa.table(kept)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--run", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        engine, work, *files = args.run
        run = with_datatrove if engine == "datatrove" else with_ray_data
        print(json.dumps(run([Path(path) for path in files], Path(work))))
        return

    work = Path(tempfile.mkdtemp())
    files = []
    for copy in range(args.copies):
        files.append(work / f"copy-{copy}.jsonl")
        shutil.copyfile(TECHDOCS / "train.jsonl", files[-1])
    megabytes = sum(path.stat().st_size for path in files) / 1e6
    print(machine())
    print(
        f"input: techdocs train x {args.copies} ({megabytes:,.0f} MB), {WORKERS} CPUs, per-document stage only"
    )
    results = {}
    for engine in ("datatrove", "ray_data"):
        results[engine] = r = run_fresh(
            "benchmarks.data_engines", engine, str(work / engine), *map(str, files)
        )
        print(f"{engine:10s} {megabytes / r['seconds']:6.2f} MB/s  {r['seconds']:6.1f} s  kept {r['kept']:,}")
    assert results["datatrove"]["kept"] == results["ray_data"]["kept"], "the engines kept different documents"
    ratio = results["ray_data"]["seconds"] / results["datatrove"]["seconds"]
    print(f"datatrove / Ray Data speed: {ratio:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
