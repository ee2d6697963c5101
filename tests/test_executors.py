"""`--executor ray` and `--executor slurm`: the same stages as `--executor local`, with the same result.

Ray runs for real: a local Ray cluster of 2 CPUs on this machine. Slurm has no cluster here, so its test puts
a stand-in scheduler on PATH (sbatch runs each array task of the submitted script at once, squeue lists
nothing) and checks what llmctl controls: the jobs it submits run the pipeline from their own processes, it
waits for every task, and a job that never ran is an error, not a hang."""

from __future__ import annotations

import json
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_corpus import prose
from test_distributed_corpus import near_copy, texts

from llmctl.data.corpus import CorpusOptions
from llmctl.data.datatrove_stages import build_corpus_distributed, encode_shards_distributed
from llmctl.data.executors import EngineSettings
from llmctl.errors import UserError

SLURM = {"partition": "cpu", "time": "01:00:00"}


def planted_corpus(tmp_path: Path) -> list[str]:
    """Three files of prose with exact and near copies across them."""
    rng = random.Random(3)
    originals = [prose(seed, 300) for seed in range(36)]
    files = []
    for index in range(3):
        lines = [{"text": text} for text in originals[index::3]]
        lines += [{"text": originals[index]}, {"text": near_copy(originals[index + 3], rng)}]
        path = tmp_path / f"docs-{index}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        files.append(str(path))
    return files


def build(sources: list[str], out: Path, engine: EngineSettings) -> dict:
    return build_corpus_distributed(sources, out, CorpusOptions(val_fraction=0.2), engine)


@pytest.fixture(scope="module")
def local_build(tmp_path_factory) -> tuple[list[str], Path, dict]:
    root = tmp_path_factory.mktemp("local")
    sources = planted_corpus(root)
    manifest = build(sources, root / "corpus", EngineSettings(tasks=3, workers=2))
    assert manifest["exact_duplicates"] == 3 and manifest["near_duplicates"] == 3
    return sources, root / "corpus", manifest


def assert_same_build(manifest: dict, corpus: Path, local: tuple[list[str], Path, dict]) -> None:
    _, local_corpus, local_manifest = local
    for key in ("documents_read", "filtered", "exact_duplicates", "near_duplicates", "splits"):
        assert manifest[key] == local_manifest[key], key
    assert texts(corpus) == texts(local_corpus)


@pytest.fixture
def ray_cluster():
    """A 2-CPU Ray cluster started by `ray start` from another directory, as a user's cluster would be."""
    ray = pytest.importorskip("ray")
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--num-cpus", "2"]
    subprocess.run([*command, "--include-dashboard=false", "--disable-usage-stats"], cwd="/", check=True)
    try:
        yield ray
    finally:
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop"], check=True)


@pytest.mark.slow
def test_the_ray_executor_joins_a_cluster_or_starts_one_and_builds_and_encodes_as_local(
    local_build, sample_pipeline, ray_cluster, monkeypatch, tmp_path
):
    monkeypatch.chdir(
        tmp_path
    )  # inputs and output named relative to here, where the cluster's workers are not
    sources = []
    for source in map(Path, local_build[0]):
        shutil.copyfile(source, source.name)
        sources.append(source.name)
    manifest = build(sources, Path("corpus"), EngineSettings("ray", 2, 2, {"address": "auto"}))
    assert_same_build(manifest, tmp_path / "corpus", local_build)
    assert manifest["engine"]["executor"] == "ray" and not list(tmp_path.glob(".*datatrove"))
    assert not ray_cluster.is_initialized()  # left, not stopped: the cluster is the user's

    corpus, tokenizer = sample_pipeline["corpus"], sample_pipeline["tokenizer"]
    (tmp_path / "ray-tokens").mkdir()
    (tmp_path / "tokens").mkdir()
    engine = EngineSettings("ray", tasks=2, workers=2)  # no address: llmctl starts Ray here and stops it
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    on_ray = encode_shards_distributed(corpus, tokenizer, tmp_path / "ray-tokens", engine, threads=1)
    locally = encode_shards_distributed(
        corpus, tokenizer, tmp_path / "tokens", EngineSettings(tasks=3, workers=2), threads=1
    )
    assert on_ray == locally and not ray_cluster.is_initialized()
    for entry in on_ray["train"]:
        assert (tmp_path / "ray-tokens" / entry["file"]).read_bytes() == (
            tmp_path / "tokens" / entry["file"]
        ).read_bytes()


def stand_in_slurm(bin_dir: Path, run_jobs: bool = True, squeue: str = "") -> None:
    """sbatch, srun, squeue and scontrol for this machine: sbatch runs every array task of the script before it answers
    (or, with run_jobs False, none: a job cancelled before it started) and prints a job id."""
    python = f"#!{sys.executable}\n"
    sbatch = python + (
        "import os, re, subprocess, sys\n"
        "script = open(sys.argv[-1]).read()\n"
        "first, last = map(int, re.search(r'--array=(\\d+)-(\\d+)', script).groups())\n"
        "env = dict(os.environ, SLURM_NODELIST='localhost', SLURM_JOB_ID='7')\n"
        "env.update(kv.split('=', 1) for a in sys.argv[1:-1] if a.startswith('--export=')"
        " for kv in a[9:].split(',')[1:])\n"
        f"for task in range(first, last + 1) if {run_jobs} else ():\n"
        "    env['SLURM_ARRAY_TASK_ID'] = str(task)\n"
        "    log = re.search(r'--output=(\\S+)', script).group(1).replace('%A', '7').replace('%a', str(task))\n"
        "    with open(log, 'w') as sink:\n"
        "        subprocess.run(['bash', sys.argv[-1]], env=env, stdout=sink, stderr=sink)\n"
        "print('Submitted batch job 7')\n"
    )
    srun = python + (
        "import os, sys\n"
        "args = sys.argv[1:]\n"
        "while args[0].startswith('-'):\n"
        "    args = args[2:] if args[0] in ('-n', '-N') else args[1:]\n"
        "os.execvp(args[0], args)\n"
    )
    scontrol = python + "import sys\nprint(sys.argv[-1])\n"  # `scontrol show hostnames LIST`: one host
    bin_dir.mkdir()
    for name, text in (
        ("sbatch", sbatch),
        ("srun", srun),
        ("squeue", python + squeue),
        ("scontrol", scontrol),
    ):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.mark.slow
def test_the_slurm_executor_submits_jobs_that_build_as_local(local_build, monkeypatch, tmp_path):
    stand_in_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin")
    manifest = build(local_build[0], tmp_path / "corpus", EngineSettings("slurm", 2, 2, SLURM))
    assert_same_build(manifest, tmp_path / "corpus", local_build)
    assert manifest["engine"]["executor"] == "slurm"


def test_a_slurm_job_that_never_ran_is_an_error_not_a_wait(local_build, monkeypatch, tmp_path):
    """squeue first fails as a busy controller does (keep waiting), then no longer knows the job (it is
    gone): the build waits through the first and stops at the second."""
    calls = tmp_path / "squeue-calls"
    squeue = (
        f"calls = open({str(calls)!r}, 'a+')\n"
        "calls.write('x'); calls.seek(0); first = len(calls.read()) == 1\n"
        "sys.stderr.write('squeue: error: Socket timed out' if first else 'slurm_load_jobs error: Invalid job id')\n"
        "sys.exit(1)\n"
    )
    stand_in_slurm(tmp_path / "bin", run_jobs=False, squeue="import sys\n" + squeue)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    engine = EngineSettings("slurm", 2, 2, {**SLURM, "poll_seconds": 0.01})
    with pytest.raises(UserError, match=r"stage 'process': 2 of 2 tasks did not finish; see "):
        build(local_build[0], tmp_path / "corpus", engine)
    assert calls.read_text() == "xx"  # asked again after the failure, stopped when the job was unknown
    assert not (tmp_path / "corpus").exists()


def test_what_an_executor_needs_is_named_before_anything_runs(llmctl_in_process, monkeypatch, tmp_path):
    source = tmp_path / "a.txt"
    source.write_text(prose(1))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data.executor_settings]\npartition = "cpu"\n')
    args = ("corpus", "build", str(source), "--out", str(tmp_path / "out"), "--executor", "slurm")
    no_time = llmctl_in_process(*args, "--recipe", str(recipe))
    assert no_time.returncode == 2 and no_time.stderr.startswith(
        "error: --executor slurm needs time in the recipe's [data.executor_settings]"
    )
    recipe.write_text('[data.executor_settings]\npartition = "cpu"\ntime = "1:00:00"\n')
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    no_sbatch = llmctl_in_process(*args, "--recipe", str(recipe))
    assert no_sbatch.stderr.strip() == (
        "error: --executor slurm: `sbatch` is not on PATH; run on a Slurm login node"
    )
    recipe.write_text('[data.executor_settings]\nspan_bytes = "64MB"\n')
    bad_span = llmctl_in_process(*args[:-1], "local", "--recipe", str(recipe))
    assert bad_span.stderr.strip() == (
        "error: [data.executor_settings] span_bytes = '64MB': give a positive number, e.g. 67108864"
    )
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*datatrove"))
