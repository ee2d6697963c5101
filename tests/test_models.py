"""`llmctl models`: versions in MLflow's registry (a real SQLite store, offline), their lineage, and
NAME@VERSION / NAME@ALIAS accepted wherever a checkpoint path is, with the weights checked on loading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import one_error_line, run_llmctl, serving, tiny_recipe_dict
from safetensors.torch import load_file, save_file

from llmctl.commands.checkpoint_args import checkpoint_path
from llmctl.digests import write_digest_manifest
from llmctl.errors import UserError
from llmctl.model.hf_format import WEIGHTS_FILE
from llmctl.recipe import recipe_from_dict
from llmctl.registry.mlflow_client import TRAINING_RUN_FILE
from llmctl.registry.store import ModelRegistry
from llmctl.train.distributed import DistributedContext
from llmctl.train.trainer import Trainer

CPU = DistributedContext(0, 0, 1, torch.device("cpu"))


@pytest.fixture
def registry(tmp_path, monkeypatch) -> ModelRegistry:
    """A fresh SQLite registry, also what every `llmctl` subprocess of the test opens (the env var)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return ModelRegistry()


@pytest.fixture
def llmctl(llmctl_in_process):
    """`llmctl` run in this process: these tests are about the registry, not the CLI's process (which
    chat and serve below keep), and each fresh interpreter would pay MLflow's 4 s of imports."""
    return llmctl_in_process


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """The session's tiny checkpoint, copied so that a test may alter it."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "tiny"))


@pytest.mark.slow
def test_a_registered_alias_resolves_in_eval_chat_and_serve(
    llmctl, registry, checkpoint, sample_pipeline, tmp_path
):
    registered = llmctl(
        "models", "register", str(checkpoint), "--name", "legal", "--alias", "prod", check=True
    )
    assert "registered legal@1 (alias prod)" in registered.stdout

    results = tmp_path / "eval.json"
    corpus = sample_pipeline["corpus"]
    llmctl("eval", "legal@prod", "--data", str(corpus), "--out", str(results), check=True)
    record = json.loads(results.read_text())
    assert Path(record["checkpoint"]) == checkpoint.resolve()
    llmctl("models", "attach", "legal@prod", str(results), check=True)
    shown = llmctl("models", "show", "legal@1", check=True).stdout
    assert "perplexity/token_perplexity" in shown and str(checkpoint.resolve()) in shown

    chat = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", "legal@prod", "--plain", "--max-tokens", "4"],
        input="Hello\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr

    with serving("legal@prod") as base:
        models = httpx.get(f"{base}/v1/models").json()["data"]
        assert [model["id"] for model in models] == ["legal@prod"]
        completion = httpx.post(
            f"{base}/v1/completions",
            json={"model": "legal@prod", "prompt": "The", "max_tokens": 3},
            timeout=60,
        )
        assert completion.status_code == 200 and completion.json()["model"] == "legal@prod"


def test_an_edited_config_is_refused_even_with_its_manifest_rewritten(llmctl, registry, checkpoint):
    """The registry digests every file that decides behaviour, not only the weights and the tokenizer."""
    registry.register(checkpoint, "legal", alias="prod")
    config = json.loads((checkpoint / "config.json").read_text())
    config["rope_theta"] = 1.0
    (checkpoint / "config.json").write_text(json.dumps(config))
    write_digest_manifest(checkpoint)  # consistent on disk: only the registry can tell
    line = one_error_line(llmctl("chat", "legal@prod", "--plain", "--max-tokens", "2"))
    assert line.startswith("error: legal@prod (version 1): the files in") and "changed since" in line
    assert "files sha256" in llmctl("models", "show", "legal@1", check=True).stdout


def test_changed_or_moved_weights_are_refused_with_one_line(llmctl, registry, checkpoint, sample_pipeline):
    registry.register(checkpoint, "legal", alias="prod")
    assert checkpoint_path(Path("legal@prod")) == checkpoint.resolve()

    weights = load_file(str(checkpoint / WEIGHTS_FILE))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01
    save_file(weights, str(checkpoint / WEIGHTS_FILE), metadata={"format": "pt"})
    write_digest_manifest(checkpoint)  # a whole, consistent checkpoint: only the registry knows it changed
    line = one_error_line(llmctl("eval", "legal@prod", "--data", str(sample_pipeline["corpus"])))
    assert line.startswith("error: legal@prod (version 1): the weights in") and "changed since" in line
    with pytest.raises(UserError, match="changed since they were registered"):
        checkpoint_path(Path("legal@1"))

    shutil.rmtree(checkpoint)
    with pytest.raises(UserError, match="no longer exists"):
        registry.resolve("legal@prod")
    with pytest.raises(UserError, match="no registered model version legal@staging"):
        registry.resolve("legal@staging")


def test_versions_are_numbered_aliases_move_and_bad_input_is_one_line(
    llmctl_in_process, registry, checkpoint, tmp_path
):
    first = registry.register(checkpoint, "legal", note="random init")
    other = Path(shutil.copytree(checkpoint, tmp_path / "other"))
    weights = load_file(str(other / WEIGHTS_FILE))
    weights["lm_head.weight" if "lm_head.weight" in weights else "model.norm.weight"] += 1.0
    save_file(weights, str(other / WEIGHTS_FILE), metadata={"format": "pt"})
    write_digest_manifest(other)
    second = registry.register(other, "legal", alias="prod")
    assert (first.version, second.version) == (1, 2) and first.note == "random init"
    assert registry.resolve("legal@latest") == other.resolve()

    registry.set_alias("legal@1", "prod")
    assert [(v.version, v.aliases) for v in registry.versions("legal")] == [(1, ("prod",)), (2, ())]
    assert registry.resolve("legal@prod") == checkpoint.resolve()
    listed = llmctl_in_process("models", "list", "legal")
    assert listed.returncode == 0, listed.stderr
    header, *lines = [line.split("\t") for line in listed.stdout.splitlines()]  # a pipe: whole fields
    assert header[:2] == ["version", "aliases"] and [line[:2] for line in lines] == [
        ["legal@1", "prod"],
        ["legal@2", ""],
    ]
    assert [line[6] for line in lines] == [str(checkpoint.resolve()), str(other.resolve())]  # never cut short
    records = [json.loads(line) for line in llmctl_in_process("models", "list", "--json").stdout.splitlines()]
    assert [record["version"] for record in records] == ["legal@1", "legal@2"]
    assert records[1]["weights"] == registry.get("legal@2").lineage("weights_sha256")

    cases = [
        (["models", "register", str(checkpoint), "--name", "legal"], "these weights are already legal@1"),
        (["models", "register", str(tmp_path / "none"), "--name", "x"], "it is not a directory"),
        (["models", "register", str(checkpoint), "--name", "a/b"], "model name 'a/b' is not usable"),
        (["models", "alias", "legal@1", "7"], "alias '7' is not usable"),
        (["models", "show", "legal@9"], "no registered model version legal@9"),
        (["models", "show", "legal"], "is not a model reference"),
    ]
    for command, message in cases:  # in this process: each `llmctl` start would cost seconds of imports
        assert message in one_error_line(llmctl_in_process(*command)), command


def test_lineage_of_a_quantized_version_names_its_registered_source(
    llmctl, registry, checkpoint, sample_pipeline, tmp_path
):
    registry.register(checkpoint, "legal", alias="prod")
    out = tmp_path / "int8"
    llmctl(
        "quantize", "legal@prod", "--method", "int8", "--out", str(out),
        "--heldout", str(sample_pipeline["corpus"]), "--heldout-tokens", "300", check=True,
    )  # fmt: skip
    version = registry.register(out, "legal-int8")
    assert version.lineage("kind") == "quantized"
    assert version.lineage("parent") == str(checkpoint.resolve())
    assert version.lineage("parent_role") == "quantization source"
    assert version.lineage("parent_version") == "legal@1"
    assert json.loads(version.lineage("quantization"))["method"] == "int8"
    shown = llmctl("models", "show", "legal-int8@1", check=True).stdout
    assert "(quantization source, registered as legal@1)" in shown


def test_training_logs_to_mlflow_resumes_its_run_and_versions_link_to_it(
    llmctl, registry, sample_pipeline, tmp_path
):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    recipe = tiny_recipe_dict(sample_pipeline, run_dir, steps=4, loggers=["mlflow"])
    recipe["data"]["corpus"] = str(sample_pipeline["corpus"])
    Trainer(recipe_from_dict(recipe), CPU).fit()
    run_id = (run_dir / TRAINING_RUN_FILE).read_text().strip()
    Trainer(recipe_from_dict({**recipe, "train": {**recipe["train"], "steps": 8}}), CPU).fit(resume="auto")
    assert (run_dir / TRAINING_RUN_FILE).read_text().strip() == run_id  # the same MLflow run continued

    client = MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.d_model"] == "64"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 9))

    early = registry.register(run_dir / "checkpoints" / "step-00000004", "legal")
    late = registry.register(run_dir / "checkpoints" / "step-00000008", "legal")
    assert early.run_id == late.run_id == run_id
    assert late.lineage("corpus_manifest_sha256") and late.lineage("tokenizer_sha256")
    results = tmp_path / "late.json"
    llmctl("eval", "legal@2", "--data", str(sample_pipeline["corpus"]), "--out", str(results), check=True)
    refused = one_error_line(llmctl("models", "attach", "legal@1", str(results)))
    assert "was measured on other weights than legal@1" in refused
    registry.attach("legal@2", json.loads(results.read_text()), results, "val")
    with pytest.raises(UserError, match="already has results labelled 'val'"):
        registry.attach("legal@2", json.loads(results.read_text()), results, "val")

    diff = llmctl("models", "diff", "legal@1", "legal@2", check=True).stdout
    steps = next(line for line in diff.splitlines() if "train.steps" in line)
    assert "4" in steps and "8" in steps and "differs" in steps
    assert "model.d_model" not in diff  # equal keys only with --all
    assert "val: perplexity/bits_per_byte" in diff


def test_without_mlflow_models_and_references_name_the_extra(tmp_path):
    stub = tmp_path / "stub" / "mlflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("No module named mlflow")\n')
    for command in (["models", "list"], ["eval", "legal@prod", "--data", str(tmp_path)]):
        line = one_error_line(run_llmctl(*command, pythonpath=[stub.parent]))
        assert (
            line
            == "error: MLflow is not installed; install the registry extra: pip install 'llmctl[registry]'"
        )


def test_a_path_that_looks_like_a_reference_is_still_a_path(tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(checkpoint, tmp_path / "legal@prod")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # never asked: the path exists
    assert checkpoint_path(Path("legal@prod")) == Path("legal@prod")


def test_an_uploaded_version_is_downloaded_once_checked_and_used_without_its_source(
    llmctl, registry, checkpoint, sample_pipeline, tmp_path, monkeypatch
):
    monkeypatch.setenv("LLMCTL_MODEL_CACHE", str(tmp_path / "cache"))
    (checkpoint / "trainer_state.pt").write_bytes(b"optimizer state")  # kept for resuming, never uploaded
    write_digest_manifest(checkpoint)
    version = registry.register(checkpoint, "legal", alias="prod", upload=True)
    assert version.source.startswith("runs:/") and version.source.endswith("/checkpoint")
    shutil.rmtree(checkpoint)  # what a tracking server's client machine has: only the store

    path = registry.resolve("legal@prod")
    assert (tmp_path / "cache") in path.parents and not (path / "trainer_state.pt").exists()
    assert registry.resolve("legal@1") == path  # downloaded once
    results = tmp_path / "eval.json"
    llmctl("eval", "legal@prod", "--data", str(sample_pipeline["corpus"]), "--out", str(results), check=True)
    assert Path(json.loads(results.read_text())["checkpoint"]) == path

    weights = load_file(str(path / WEIGHTS_FILE))
    weights["model.norm.weight"] += 1.0
    save_file(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(UserError, match="changed since they were registered"):
        registry.resolve("legal@prod")


@pytest.mark.parametrize("store", ["random", "truncated", "directory", "ftp", "unreachable"])
def test_a_registry_store_that_cannot_be_used_is_one_line_within_seconds(store, tmp_path):
    """Issue 39 #10: a damaged mlflow.db, a directory, an unknown scheme and an unreachable server were
    tracebacks or minutes of retries."""
    import time

    from conftest import free_port, run_llmctl

    uri = {
        "random": f"sqlite:///{tmp_path / 'random.db'}",
        "truncated": f"sqlite:///{tmp_path / 'truncated.db'}",
        "directory": f"sqlite:///{tmp_path}",
        "ftp": "ftp://registry.example/x",
        "unreachable": f"http://127.0.0.1:{free_port()}",
    }[store]
    (tmp_path / "random.db").write_bytes(os.urandom(8192))
    (tmp_path / "truncated.db").write_bytes(
        b"SQLite format 3\x00" + bytes(100)
    )  # a header, then nothing whole
    started = time.monotonic()
    for command in (
        ["models", "list", "--registry", uri],
        ["models", "show", "legal@prod", "--registry", uri],
    ):
        line = one_error_line(run_llmctl(*command, timeout=60))
        assert "registry" in line, line
    assert time.monotonic() - started < 40  # two commands, each starting Python and MLflow


def test_two_registers_of_the_same_weights_started_together_leave_one_version(registry, checkpoint):
    """Issue 39, low: the loser printed MLflow's raw message (and both could become versions)."""
    command = [sys.executable, "-m", "llmctl", "models", "register", str(checkpoint), "--name", "legal"]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outcomes = sorted((process.wait(120), *process.communicate()) for process in processes)
    (won, won_out, _), (lost, _, lost_err) = outcomes
    assert won == 0 and "registered legal@" in won_out
    line = lost_err.strip()
    assert lost == 2 and "\n" not in line and line.startswith("error: these weights ") and "legal@" in line, (
        lost_err
    )
    assert len(registry.versions("legal")) == 1


def test_a_register_that_lost_the_race_after_the_check_deletes_its_version(registry, checkpoint, monkeypatch):
    """Both registers passed the check for existing weights: the later version is removed, in one line."""
    registry.register(checkpoint, "legal")
    real = registry._versions_with_weights
    calls = []

    def raced(digest, name=None):  # the first look (before creating) saw nothing yet
        calls.append(digest)
        return [] if len(calls) == 1 else real(digest, name)

    monkeypatch.setattr(registry, "_versions_with_weights", raced)
    with pytest.raises(UserError, match="these weights were registered as legal@1 at the same time"):
        registry.register(checkpoint, "legal")
    assert [version.version for version in registry.versions("legal")] == [1]
