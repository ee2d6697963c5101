"""torchrun on CPU (gloo): DDP and FSDP2 reproduce the single-process run with the same global batch."""

from __future__ import annotations

import json

import pytest
import tomli_w
import torch
from conftest import tiny_recipe_dict

from llmctl.checkpoint import list_checkpoints
from llmctl.model.hf_format import read_state_dict
from llmctl.train.run_log import RunLog

pytestmark = pytest.mark.slow


def write_recipe(path, pipeline, run_dir, strategy, optimizer="adamw"):
    recipe = tiny_recipe_dict(pipeline, run_dir, steps=6, micro_batch_size=2, eval_every=3)
    recipe["name"] = "dist"
    recipe["model"]["tie_embeddings"] = True
    recipe["optim"] |= {"name": optimizer, "embedding_lr_scale": 1.0}  # one rate: the tolerance below is lr's
    recipe["checkpoint"] = {"dir": str(run_dir), "every": 0}
    recipe["distributed"] = {"strategy": strategy, "backend": "gloo"}
    path.write_text(tomli_w.dumps(recipe))
    return path


def metrics(run_dir, event, key):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if r["event"] == event}


@pytest.fixture(scope="module")
def single_runs(sample_pipeline, tmp_path_factory):
    """The one-process run each optimizer's two-process runs are compared with, trained when first asked for."""
    from conftest import run_llmctl

    runs = {}

    def single_run(optimizer: str):
        if optimizer not in runs:
            root = tmp_path_factory.mktemp(f"single-{optimizer}")
            recipe = write_recipe(root / "single.toml", sample_pipeline, root / "run", "none", optimizer)
            run_llmctl("train", str(recipe), check=True)
            runs[optimizer] = root / "run"
        return runs[optimizer]

    return single_run


@pytest.mark.parametrize(("strategy", "optimizer"), [("ddp", "muon"), ("fsdp", "adamw")])
def test_two_processes_match_one(sample_pipeline, single_runs, tmp_path, llmctl, strategy, optimizer):
    recipe = write_recipe(
        tmp_path / f"{strategy}.toml", sample_pipeline, tmp_path / "run", strategy, optimizer
    )
    result = llmctl("train", str(recipe), "--nproc", "2", check=True)
    assert result.stdout.count("training dist") == 1  # only rank 0 reports
    assert f"on 2 x cpu ({strategy}, fp32)" in result.stdout
    single_run = single_runs(optimizer)
    ours, reference = metrics(tmp_path / "run", "step", "loss"), metrics(single_run, "step", "loss")
    assert sorted(ours) == list(range(1, 7))
    for step, loss in reference.items():
        assert abs(ours[step] - loss) <= 1e-4 * abs(loss), (step, ours[step], loss)
    val, val_reference = (
        metrics(tmp_path / "run", "eval", "val_loss"),
        metrics(single_run, "eval", "val_loss"),
    )
    assert all(abs(val[s] - val_reference[s]) <= 1e-4 * val_reference[s] for s in val_reference)

    ((_, ours_ckpt),) = list_checkpoints(tmp_path / "run")
    ((_, reference_ckpt),) = list_checkpoints(single_run)
    a, b = read_state_dict(ours_ckpt), read_state_dict(reference_ckpt)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        # Adam divides by sqrt(v): an element whose gradient is ~0 turns reduction-order noise into a visible
        # step. 1e-4 is 3% of one step at lr 3e-3; a wrong gradient moves weights by ~lr per step. Muon
        # orthogonalises in bf16, where the same noise moves a weight by up to half of its step (~6e-4 per
        # element here), so 1e-3 there; the losses above still agree to 1e-4 at every step.
        tolerance = 1e-4 if optimizer == "adamw" else 1e-3
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=tolerance)
    assert json.loads((ours_ckpt / "config.json").read_text()) == json.loads(
        (reference_ckpt / "config.json").read_text()
    )
    # each rank reported its own throughput; the monitor's run log shows one row per rank at the last step
    log = RunLog(tmp_path / "run").read_all()
    assert sorted(log.ranks) == [0, 1] and log.status() == "finished"
    assert all(row.step == 6 and row.tokens_per_second > 0 for row in log.ranks.values())


def test_muon_under_fsdp_is_refused_with_the_fix(sample_pipeline, tmp_path, llmctl):
    recipe = tiny_recipe_dict(sample_pipeline, tmp_path / "run", steps=2)
    recipe["optim"]["name"] = "muon"
    recipe["distributed"] = {"strategy": "fsdp", "backend": "gloo"}
    (tmp_path / "muon.toml").write_text(tomli_w.dumps(recipe))
    result = llmctl("train", str(tmp_path / "muon.toml"), "--nproc", "2")
    assert result.returncode != 0
    assert 'needs every weight matrix whole, and FSDP shards them: set optim.name = "adamw"' in result.stderr
    assert not list_checkpoints(tmp_path / "run")


def test_lora_under_fsdp_matches_one_process_and_resumes(tiny_checkpoint, tmp_path, llmctl):
    """Two FSDP ranks shard the frozen base and the adapter; the adapter they save (gathered from its shards)
    equals one process's, and a run resumed from a sharded checkpoint ends where the uninterrupted one did."""
    from safetensors.torch import load_file
    from test_finetune import CPU, finetune_dict, write_examples

    from llmctl.checkpoint import ADAPTER_WEIGHTS_FILE
    from llmctl.recipe import recipe_from_dict
    from llmctl.train.finetune import FinetuneTrainer, finetune_recipe

    examples = write_examples(tmp_path / "examples.jsonl")

    def recipe(run_dir, strategy):
        raw = finetune_dict(tiny_checkpoint, examples, run_dir, global_batch_size=4, micro_batch_size=2)
        raw["finetune"] |= {"lora": {"dropout": 0.0}, "packing": False}  # two held-out windows, one per rank
        raw["checkpoint"]["every"] = 3
        raw["distributed"] = {"strategy": strategy, "backend": "gloo"}
        return raw

    single = tmp_path / "single"
    FinetuneTrainer(finetune_recipe(recipe_from_dict(recipe(single, "none"))), CPU).fit()
    path = tmp_path / "fsdp.toml"
    path.write_text(tomli_w.dumps(recipe(tmp_path / "fsdp", "fsdp")))
    result = llmctl("finetune", str(path), "--nproc", "2", check=True)
    assert "on 2 x cpu (fsdp, fp32)" in result.stdout
    ours, reference = metrics(tmp_path / "fsdp", "step", "loss"), metrics(single, "step", "loss")
    assert sorted(ours) == list(range(1, 7))
    assert all(abs(ours[step] - loss) <= 1e-4 * loss for step, loss in reference.items())

    def adapter(run_dir, step):
        return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / ADAPTER_WEIGHTS_FILE))

    expected = adapter(single, 6)
    assert expected and all("lora_" in name for name in expected)
    for saved in (adapter(tmp_path / "fsdp", 3), adapter(tmp_path / "fsdp", 6)):
        assert saved.keys() == expected.keys()
    for name, tensor in adapter(tmp_path / "fsdp", 6).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-4)

    # drop the last checkpoint and resume from step 3's sharded adapter and optimizer state
    final = tmp_path / "fsdp" / "checkpoints" / "step-00000006"
    for file in final.iterdir():
        file.unlink()
    final.rmdir()
    result = llmctl("finetune", str(path), "--nproc", "2", "--resume", "auto", check=True)
    assert "resumed from" in result.stdout
    for name, tensor in adapter(tmp_path / "fsdp", 6).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-4)
