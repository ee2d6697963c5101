"""The training engine: loss falls, exact resume, non-finite steps skipped, precisions, schedules."""

from __future__ import annotations

import json
import math
import tomllib

import numpy as np
import pytest
import torch
from conftest import tiny_recipe_dict

from llmctl.checkpoint import list_checkpoints
from llmctl.digests import write_digest_manifest
from llmctl.errors import UserError
from llmctl.model.hf_format import read_state_dict
from llmctl.recipe import ScheduleSection, recipe_from_dict
from llmctl.train.distributed import DistributedContext
from llmctl.train.events import StepLogged, StepSkipped
from llmctl.train.metrics import device_peak_flops, measure_cpu_matmul_peak, read_metrics
from llmctl.train.optim import build_optimizer, lr_at, parameter_groups
from llmctl.train.trainer import Trainer

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_recipe(pipeline, run_dir, **train):
    return recipe_from_dict(tiny_recipe_dict(pipeline, run_dir, **train))


def step_losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["event"] == "step"}


def test_loss_falls_below_the_unigram_entropy(sample_pipeline, tmp_path):
    tokens = np.fromfile(sample_pipeline["tokens"] / "train.bin", dtype=np.uint16)
    counts = np.bincount(tokens).astype(np.float64)
    probs = counts[counts > 0] / counts.sum()
    unigram_entropy = float(-(probs * np.log(probs)).sum())
    recipe = tiny_recipe(
        sample_pipeline,
        tmp_path,
        steps=200,
        log_every=10,
        micro_batch_size=16,
        global_batch_size=16,
        sample_prompts=["The"],
    )
    recipe.optim.lr = 5e-3
    result = Trainer(recipe, CPU).fit()
    assert result.val_loss < unigram_entropy - 0.5, (result.val_loss, unigram_entropy)
    ((prompt, text),) = result.samples
    assert text.startswith("The") and len(text) > len("The") + 10
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["event"] == "step")
    for key in ("loss", "lr", "grad_norm", "tokens_per_second", "mfu", "memory_bytes"):
        assert key in step and math.isfinite(step[key]), key
    assert any(r["event"] == "eval" and "val_loss" in r for r in records)


def test_cpu_mfu_is_quoted_against_the_gemm_peak_of_the_dtype_autocast_computes_in():
    # a bf16 run against the fp32 peak read 150% MFU on a CPU with AVX512_BF16
    assert device_peak_flops(CPU.device, "bf16") == measure_cpu_matmul_peak(dtype=torch.bfloat16)
    assert device_peak_flops(CPU.device, "fp32") == measure_cpu_matmul_peak(dtype=torch.float32)
    assert measure_cpu_matmul_peak(dtype=torch.bfloat16) != measure_cpu_matmul_peak(dtype=torch.float32)


def test_mfu_never_passes_100_percent_after_a_peak_measured_on_a_busy_machine(sample_pipeline, tmp_path):
    """A peak measured while the machine was busy made MFU read 150% once the load lifted: the trainer
    measures again when MFU would pass 100%, keeps the best peak, and never reports more than 100%."""
    from llmctl.train.trainer import StepStats

    trainer = Trainer(tiny_recipe(sample_pipeline, tmp_path), CPU)
    trainer.peak_flops = 1e6  # as if measured under load: far below this CPU's GEMM rate
    stats = StepStats(step=1, loss=1.0, lr=1e-3, grad_norm=1.0)
    logged = trainer._step_logged(stats, tokens=4096, seconds=0.01)
    assert trainer.peak_flops > 1e9  # measured again
    assert 0 < logged.mfu <= 1.0


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_reproduces_the_uninterrupted_run_bitwise(sample_pipeline, tmp_path, optimizer):
    def recipe(run_dir):
        recipe = tiny_recipe(sample_pipeline, run_dir)
        recipe.optim.name = optimizer
        return recipe

    Trainer(recipe(tmp_path / "straight"), CPU).fit()
    straight = step_losses(tmp_path / "straight")

    interrupted_dir = tmp_path / "interrupted"
    first = Trainer(recipe(interrupted_dir), CPU)

    def stop_at_half(event):
        if isinstance(event, StepLogged) and event.step == 4:
            first.stop_requested = True  # what SIGINT/SIGTERM do

    first.on_event = stop_at_half
    result = first.fit()
    assert result.interrupted and result.final_step == 4
    assert [step for step, _ in list_checkpoints(interrupted_dir)] == [4]
    Trainer(recipe(interrupted_dir), CPU).fit(resume="auto")
    resumed = step_losses(interrupted_dir)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == straight  # exact float equality, step for step
    final = read_state_dict(list_checkpoints(interrupted_dir)[-1][1])
    reference = read_state_dict(list_checkpoints(tmp_path / "straight")[-1][1])
    assert all(torch.equal(final[name], reference[name]) for name in reference)


def test_a_resume_trains_with_its_own_recipes_rates_and_decay(sample_pipeline, tmp_path):
    def recipe(steps: int, optim: dict):
        raw = tiny_recipe_dict(sample_pipeline, tmp_path, steps=steps)
        raw["optim"] |= optim
        return recipe_from_dict(raw)

    Trainer(recipe(4, {"embedding_lr_scale": 2.0, "head_lr_scale": 1.0, "weight_decay": 0.1}), CPU).fit()
    resumed = Trainer(recipe(8, {"embedding_lr_scale": 5.0, "head_lr_scale": 7.0, "weight_decay": 0.2}), CPU)
    resumed.fit(resume="auto")
    names = {id(p): n for n, p in resumed.model.named_parameters()}
    settings = {
        names[id(p)]: (group["lr_scale"], group["weight_decay"])
        for group in resumed.optimizer.param_groups
        for p in group["params"]
    }
    assert settings["model.embed_tokens.weight"] == (5.0, 0.0)
    assert settings["lm_head.weight"] == (7.0, 0.2)
    assert settings["model.layers.0.mlp.down_proj.weight"] == (1.0, 0.2)


def test_non_finite_gradients_skip_the_step_and_training_continues(sample_pipeline, tmp_path):
    trainer = Trainer(tiny_recipe(sample_pipeline, tmp_path, steps=6), CPU)
    events = []
    trainer.on_event = events.append
    calls = {"n": 0}

    def poison_third_step(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in (5, 6) else grad  # both micro-batches of step 3

    trainer.model.model.layers[0].mlp.down_proj.weight.register_hook(poison_third_step)
    result = trainer.fit()
    assert [event.step for event in events if isinstance(event, StepSkipped)] == [3]
    assert result.skipped_steps == 1 and result.final_step == 6
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    losses = step_losses(tmp_path)
    assert all(math.isfinite(losses[step]) for step in (4, 5, 6))
    record = next(
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"skipped"' in line
    )
    assert record["step"] == 3


def step_records(run_dir) -> list[dict]:
    return [record for record in read_metrics(run_dir) if record["event"] == "step"]


def test_a_wall_clock_budget_stops_within_one_step_and_a_resumed_run_finishes_it(sample_pipeline, tmp_path):
    budget = 0.08  # minutes: long enough for several steps on a loaded 2-core machine
    recipe = tiny_recipe(sample_pipeline, tmp_path / "whole", steps=100_000, max_minutes=budget)
    result = Trainer(recipe, CPU).fit()
    steps = step_records(tmp_path / "whole")
    assert not result.interrupted and result.final_step == steps[-1]["step"] < 100_000
    assert (
        steps[-2]["elapsed_seconds"] < budget * 60 <= steps[-1]["elapsed_seconds"]
    )  # the budget ran out in the last step
    assert [step for step, _ in list_checkpoints(tmp_path / "whole")][-1] == result.final_step

    def followed_the_clock(records) -> bool:
        """The last step's lr is the schedule's at the share of the budget spent when that step began (on a
        loaded machine a step is a large share of so short a budget, so this is checked, not the floor)."""
        spent = records[-2]["elapsed_seconds"] / (budget * 60)
        expected = lr_at(records[-1]["step"] - 1, 100_000, recipe.optim.lr, recipe.schedule, spent)
        return records[-1]["lr"] == pytest.approx(expected, rel=0.05, abs=1e-3 * recipe.optim.lr)

    assert followed_the_clock(steps)

    run_dir = tmp_path / "resumed"
    first = Trainer(tiny_recipe(sample_pipeline, run_dir, steps=100_000, max_minutes=budget), CPU)

    def stop_halfway(event):
        if isinstance(event, StepLogged) and event.elapsed_seconds >= budget * 30:
            first.stop_requested = True

    first.on_event = stop_halfway
    interrupted = first.fit()
    assert interrupted.interrupted
    before = step_records(run_dir)
    Trainer(tiny_recipe(sample_pipeline, run_dir, steps=100_000, max_minutes=budget), CPU).fit(resume="auto")
    after = [record for record in step_records(run_dir) if record["step"] > interrupted.final_step]
    assert after[0]["elapsed_seconds"] >= before[-1]["elapsed_seconds"]  # the clock carried over
    assert after[0]["lr"] <= before[-1]["lr"]  # the schedule continued, it did not restart
    assert after[-2]["elapsed_seconds"] < budget * 60 <= after[-1]["elapsed_seconds"]
    assert followed_the_clock(after)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_run_on_cpu(sample_pipeline, tmp_path, precision):
    trainer = Trainer(tiny_recipe(sample_pipeline, tmp_path, steps=3, precision=precision), CPU)
    seen = []
    trainer.model.model.layers[0].self_attn.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    result = trainer.fit()
    assert seen[0] == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert all(math.isfinite(loss) for loss in step_losses(tmp_path).values())
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    assert result.checkpoint is not None
    assert read_state_dict(result.checkpoint)["lm_head.weight"].dtype == torch.float32  # fp32 master weights


def test_activation_checkpointing_gives_the_same_losses(sample_pipeline, tmp_path):
    Trainer(tiny_recipe(sample_pipeline, tmp_path / "a", steps=3), CPU).fit()
    Trainer(tiny_recipe(sample_pipeline, tmp_path / "b", steps=3, activation_checkpointing=True), CPU).fit()
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a)


def test_tokenizer_mismatch_is_an_error_at_train_start(sample_pipeline, tmp_path):
    other = tmp_path / "other.model"
    other.write_bytes(sample_pipeline["tokenizer"].read_bytes())
    from llmctl.data.tokenizer import train_tokenizer

    train_tokenizer(sample_pipeline["corpus"], tmp_path / "tok", 512)
    recipe = tiny_recipe(sample_pipeline, tmp_path / "run")
    recipe.data.tokenizer = str(tmp_path / "tok" / "tokenizer.model")
    with pytest.raises(UserError, match="tokenizer mismatch"):
        Trainer(recipe, CPU)


def test_checkpoints_are_pruned_to_keep_last(sample_pipeline, tmp_path):
    recipe = tiny_recipe(sample_pipeline, tmp_path, steps=6)
    recipe.checkpoint.every, recipe.checkpoint.keep_last = 2, 2
    Trainer(recipe, CPU).fit()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    assert not list(tmp_path.glob("checkpoints/.*"))


def test_a_recipe_without_a_learning_rate_gets_one_scaled_by_width_for_its_optimizer(
    sample_pipeline, tmp_path
):
    shape = {"vocab_size": 8000, "n_layer": 6, "n_head": 6, "max_seq_len": 256}

    def rates(**optim) -> dict[int, float]:
        return {
            d: recipe_from_dict({"model": {**shape, "d_model": d}, "optim": optim}).optim.lr
            for d in (192, 384, 2048)
        }

    assert rates() == {192: 7.2e-3, 384: 3.6e-3, 2048: 6.75e-4}  # Muon, the default
    assert rates(name="adamw") == {192: 2.13e-3, 384: 1.07e-3, 2048: 2e-4}  # 1/width from the brief's 1.3B
    assert recipe_from_dict({"model": {**shape, "d_model": 384}, "optim": {"lr": 1e-4}}).optim.lr == 1e-4
    raw = tiny_recipe_dict(sample_pipeline, tmp_path, steps=1)
    del raw["optim"]["lr"]
    Trainer(recipe_from_dict(raw), CPU).fit()
    saved = recipe_from_dict(tomllib.loads((tmp_path / "recipe.toml").read_text()))
    assert saved.optim.lr == 0.0216 and "lr = 0.0216" in (tmp_path / "recipe.toml").read_text()


def test_schedules():
    cosine = ScheduleSection(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, 1.0, cosine) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, cosine) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, cosine) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, cosine) == pytest.approx(0.55)
    linear = ScheduleSection(kind="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(50, 100, 1.0, linear) == pytest.approx(0.5)
    wsd = ScheduleSection(kind="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(79, 100, 1.0, wsd) == 1.0
    assert lr_at(90, 100, 1.0, wsd) == pytest.approx(0.5)
    assert lr_at(0, 100, 1.0, ScheduleSection(kind="constant", warmup_steps=0)) == 1.0


def test_the_default_warmup_is_a_share_of_the_run_in_steps_or_on_the_clock():
    default = ScheduleSection(kind="constant")  # no warmup_steps: 5% of the run
    assert lr_at(0, 244, 1.0, default) == pytest.approx(1 / 12)
    assert lr_at(11, 244, 1.0, default) == 1.0
    assert lr_at(99, 4000, 1.0, default) == pytest.approx(0.5)
    budget = ScheduleSection(kind="cosine", warmup_fraction=0.1, min_lr_ratio=0.0)
    assert lr_at(3, 100_000, 1.0, budget, time_fraction=0.05) == pytest.approx(0.5)  # not 3 / 10,000 steps
    assert lr_at(50, 100_000, 1.0, budget, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_at(3, 100_000, 1.0, ScheduleSection(warmup_steps=8), time_fraction=0.5) == 0.5  # steps win


def test_no_weight_decay_on_norms_and_embeddings():
    from llmctl.model import ModelConfig, Transformer
    from llmctl.recipe import OptimSection

    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2, tie_embeddings=True))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model, OptimSection(weight_decay=0.1, embedding_lr_scale=1))
    assert {names[id(p)] for p in no_decay["params"]} == {
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decay, _ = parameter_groups(model, OptimSection(decay_embeddings=True, embedding_lr_scale=1))
    assert "model.embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    groups = parameter_groups(model, OptimSection(embedding_lr_scale=10), lr_scale=lambda name: 0.5)
    embedding = next(
        group for group in groups if names[id(group["params"][0])] == "model.embed_tokens.weight"
    )
    assert len(embedding["params"]) == 1 and embedding["lr_scale"] == 5.0
    assert {group["lr_scale"] for group in groups if group is not embedding} == {0.5}


def test_the_embedding_and_an_untied_head_get_their_own_rates():
    from llmctl.model import ModelConfig, Transformer

    def rates(tied: bool, optim: dict) -> dict[str, float]:
        shape = {"vocab_size": 50, "d_model": 16, "n_layer": 1, "n_head": 2, "tie_embeddings": tied}
        recipe = recipe_from_dict({"name": "r", "model": shape, "optim": optim})
        model = Transformer(ModelConfig(**shape))
        names = {id(p): n for n, p in model.named_parameters()}
        return {
            names[id(p)]: g["lr_scale"] for g in parameter_groups(model, recipe.optim) for p in g["params"]
        }

    untied = rates(False, {})
    assert untied["model.embed_tokens.weight"] == 30.0 and untied["lm_head.weight"] == 3.0
    assert {rate for name, rate in untied.items() if "embed" not in name and "lm_head" not in name} == {1.0}
    tied = rates(True, {"head_lr_scale": 5.0})  # a tied head is the embedding: one rate, the embedding's
    assert tied["model.embed_tokens.weight"] == 10.0 and "lm_head.weight" not in tied
    assert rates(False, {"embedding_lr_scale": 2.0, "head_lr_scale": 1.0})["lm_head.weight"] == 1.0
    assert rates(False, {"embedding_lr_scale": 2.0})["model.embed_tokens.weight"] == 2.0


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from llmctl.model import ModelConfig, Transformer
    from llmctl.recipe import OptimSection

    model = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layer=1, n_head=2))
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adamw = build_optimizer(
        model, OptimSection(name="muon", lr=1e-3, embedding_lr_scale=10), CPU.device
    ).parts
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {names[id(p)] for group in muon.param_groups for p in group["params"]} == {
        f"model.layers.0.{name}.weight"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
        + ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    }
    assert all(group["weight_decay"] == 0.1 for group in muon.param_groups)
    assert {names[id(p)]: group["weight_decay"] for group in adamw.param_groups for p in group["params"]} == {
        "model.embed_tokens.weight": 0.0,
        "lm_head.weight": 0.1,
        "model.layers.0.input_layernorm.weight": 0.0,
        "model.layers.0.post_attention_layernorm.weight": 0.0,
        "model.norm.weight": 0.0,
    }


def test_the_plan_counts_one_moment_for_muon_matrices_and_two_for_adamw():
    from llmctl.train.plan import make_plan

    shape = {"vocab_size": 1000, "d_model": 64, "n_layer": 2, "n_head": 4, "max_seq_len": 64}
    adamw = make_plan(recipe_from_dict({"model": shape, "optim": {"name": "adamw"}}))
    muon = make_plan(recipe_from_dict({"model": shape, "optim": {"name": "muon"}}))
    assert adamw.memory["optimizer"] == 8 * adamw.parameters
    assert muon.memory["optimizer"] == 4 * muon.parameters + 4 * (2 * 1000 * 64)  # untied: embedding and head


@pytest.mark.parametrize("written_before_muon", [False, True])
def test_resuming_under_another_optimizer_is_refused(sample_pipeline, tmp_path, written_before_muon):
    first = tiny_recipe(sample_pipeline, tmp_path, steps=4)
    first.optim.name = "adamw"
    Trainer(first, CPU).fit()
    if written_before_muon:  # AdamW moments, under a recipe and a state that do not name the optimizer
        ((_, checkpoint),) = list_checkpoints(tmp_path)
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
        del state["optimizer_name"]
        torch.save(state, checkpoint / "trainer_state.pt")
        recipe_file = checkpoint / "recipe.toml"
        written = recipe_file.read_text()
        assert 'name = "adamw"\n' in written
        recipe_file.write_text(written.replace('name = "adamw"\n', ""))
        write_digest_manifest(checkpoint)
    with pytest.raises(UserError, match="optim.name adamw -> muon"):
        Trainer(tiny_recipe(sample_pipeline, tmp_path, steps=8), CPU).fit(resume="auto")


def test_sigint_saves_a_checkpoint_and_exits_130(sample_pipeline, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import tomli_w

    recipe = tiny_recipe(sample_pipeline, tmp_path / "run", steps=100_000)
    recipe.checkpoint.every = 0
    path = tmp_path / "long.toml"
    path.write_text(tomli_w.dumps(recipe.model_dump(mode="json", exclude_none=True)))
    process = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "train", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert time.time() < deadline and process.poll() is None, "training did not start"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGINT)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "interrupted at step" in stdout
    ((step, checkpoint),) = list_checkpoints(tmp_path / "run")
    assert step >= 3 and (checkpoint / "trainer_state.pt").is_file()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_names(sample_pipeline, tmp_path):
    Trainer(tiny_recipe(sample_pipeline, tmp_path / "eager", steps=3), CPU).fit()
    result = Trainer(tiny_recipe(sample_pipeline, tmp_path / "compiled", steps=3, compile=True), CPU).fit()
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert all(abs(eager[s] - compiled[s]) <= 1e-4 * abs(eager[s]) for s in eager)
    names = list(read_state_dict(result.checkpoint))
    assert names and not any(name.startswith(("_orig_mod.", "module.")) for name in names)


class _Payload:
    """What a crafted checkpoint would hide in its trainer state: code that runs when unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_trainer_state_cannot_run_code_on_resume(sample_pipeline, tmp_path, llmctl_in_process):
    import tomli_w

    recipe = tiny_recipe(sample_pipeline, tmp_path / "run", steps=4)
    Trainer(recipe, CPU).fit()
    ((_, checkpoint),) = [c for c in list_checkpoints(tmp_path / "run") if c[0] == 4]
    marker = tmp_path / "pwned"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    torch.save({**state, "extra": _Payload(str(marker))}, checkpoint / "trainer_state.pt")
    path = tmp_path / "recipe.toml"
    path.write_text(
        tomli_w.dumps(
            recipe.model_dump(mode="json", exclude_none=True)
            | {"train": {**recipe.train.model_dump(exclude_none=True), "steps": 6}}
        )
    )
    result = llmctl_in_process("train", str(path), "--resume", str(checkpoint))
    assert result.returncode == 2 and "does not match its digest" in result.stderr
    write_digest_manifest(checkpoint)  # a crafted checkpoint comes with a matching manifest
    result = llmctl_in_process("train", str(path), "--resume", str(checkpoint))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not a trainer state llmctl wrote" in lines[0]
    assert not marker.exists()
