"""`llmctl distill`: a student taught by a trained teacher beats the same student trained alone."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_recipe_dict

from llmctl.errors import UserError
from llmctl.recipe import recipe_from_dict
from llmctl.train.distill import DistillTrainer, distillation_loss
from llmctl.train.distributed import DistributedContext
from llmctl.train.trainer import Trainer

CPU = DistributedContext(0, 0, 1, torch.device("cpu"))
STUDENT = {"d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_ff": 64}


def student_dict(pipeline, run_dir, **extra) -> dict:
    raw = tiny_recipe_dict(pipeline, run_dir, steps=200, log_every=50, eval_batches=8)
    raw["model"].update(STUDENT)
    raw["optim"]["lr"] = 1e-2
    raw["checkpoint"]["every"] = 0
    return {**raw, **extra}


def test_the_loss_is_the_blend_of_softened_kl_and_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 0] = -100
    loss, ce = distillation_loss(student, teacher, targets, alpha=0.3, temperature=2.0)
    kept = targets != -100
    p = torch.softmax(teacher[kept] / 2, -1)
    kl = (p * (p.log() - torch.log_softmax(student[kept] / 2, -1))).sum(-1).mean()
    expected_ce = torch.nn.functional.cross_entropy(student[kept], targets[kept])
    torch.testing.assert_close(ce, expected_ce)
    torch.testing.assert_close(loss, 0.3 * 4 * kl + 0.7 * expected_ce)
    same, _ = distillation_loss(teacher, teacher, targets, alpha=1.0, temperature=2.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_a_distilled_student_beats_the_same_student_trained_alone(sample_pipeline, tmp_path):
    raw = tiny_recipe_dict(sample_pipeline, tmp_path / "teacher", steps=600, log_every=100, eval_batches=8)
    raw["optim"]["lr"] = 1e-2  # longer and wider than the student: 4.40 against the student's 4.59 alone
    raw["checkpoint"]["every"] = 0
    teacher_result = Trainer(recipe_from_dict(raw), CPU).fit()

    alone = Trainer(recipe_from_dict(student_dict(sample_pipeline, tmp_path / "alone")), CPU).fit()
    raw = student_dict(
        sample_pipeline, tmp_path / "distilled", distill={"teacher": str(tmp_path / "teacher"), "alpha": 0.5}
    )
    trainer = DistillTrainer(recipe_from_dict(raw), CPU)
    assert trainer.teacher_val_loss == pytest.approx(teacher_result.val_loss, rel=1e-4)  # same windows
    distilled = trainer.fit()
    assert distilled.val_loss < alone.val_loss - 0.05, (distilled.val_loss, alone.val_loss)  # 4.43 here
    assert math.isfinite(distilled.val_loss) and teacher_result.val_loss < distilled.val_loss


def test_distill_refuses_a_teacher_it_cannot_use(sample_pipeline, tiny_checkpoint, tmp_path):
    missing = student_dict(sample_pipeline, tmp_path / "a", distill={"teacher": str(tmp_path / "none")})
    with pytest.raises(UserError, match="distill.teacher .*none: it does not exist"):
        DistillTrainer(recipe_from_dict(missing), CPU)
    wider = student_dict(sample_pipeline, tmp_path / "b", distill={"teacher": str(tiny_checkpoint)})
    wider["model"]["vocab_size"] = 2048
    with pytest.raises(UserError, match="the teacher has 1024 embeddings, the student 2048"):
        DistillTrainer(recipe_from_dict(wider), CPU)


def test_the_top_k_loss_over_every_token_is_the_full_loss():
    from llmctl.train.distill import top_k_distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 3] = -100
    full = distillation_loss(student, teacher, targets, alpha=0.3, temperature=2.0)
    normalizer = torch.logsumexp(teacher / 2.0, dim=-1)
    top = teacher.topk(11, dim=-1)
    every = top_k_distillation_loss(student, top.values, top.indices, normalizer, targets, 0.3, 2.0)
    torch.testing.assert_close(every, full)

    # three tokens and the rest: the KL of those four outcomes, as computed by hand
    top = teacher.topk(3, dim=-1)
    three, ce = top_k_distillation_loss(student, top.values, top.indices, normalizer, targets, 1.0, 2.0)
    kept = targets != -100
    p = torch.softmax(teacher[kept] / 2, -1).gather(1, top.indices[kept])
    q = torch.softmax(student[kept] / 2, -1).gather(1, top.indices[kept])
    p, q = torch.cat((p, 1 - p.sum(-1, keepdim=True)), -1), torch.cat((q, 1 - q.sum(-1, keepdim=True)), -1)
    torch.testing.assert_close(three, 4 * (p * (p / q).log()).sum(-1).mean())
    assert torch.equal(ce, full[1]) and float(three) < float(full[0] - 0.7 * full[1]) / 0.3  # a lower bound


@pytest.fixture(scope="module")
def short_pipeline(sample_pipeline, tmp_path_factory) -> dict:
    """The sample pipeline with its training tokens cut to 64k: a teacher cache covers every training token,
    and the whole sample's 518k took most of a minute per test."""
    import json
    import shutil

    import numpy as np

    tokens = tmp_path_factory.mktemp("short") / "tokens"
    shutil.copytree(sample_pipeline["tokens"], tokens)
    meta = json.loads((tokens / "meta.json").read_text())
    kept = 65_536
    width = np.dtype(meta["dtype"]).itemsize
    (tokens / "train.bin").write_bytes((tokens / "train.bin").read_bytes()[: kept * width])
    meta["tokens"]["train"] = kept
    (tokens / "meta.json").write_text(json.dumps(meta))
    return {**sample_pipeline, "tokens": tokens}


def offline_dict(pipeline, teacher, run_dir, cache, top_k=16, steps=6) -> dict:
    raw = student_dict(
        pipeline, run_dir, distill={"teacher": str(teacher), "teacher_cache": str(cache), "top_k": top_k}
    )
    raw["train"].update(steps=steps, log_every=1, eval_batches=2)
    return raw


def test_offline_distillation_reads_the_teachers_top_k_for_each_window(
    short_pipeline, tiny_checkpoint, tmp_path
):
    from llmctl.train.distill import top_k_distillation_loss
    from llmctl.train.teacher_cache import META_FILE

    cache = tmp_path / "cache"
    raw = offline_dict(short_pipeline, tiny_checkpoint, tmp_path / "run", cache)
    trainer = DistillTrainer(recipe_from_dict(raw), CPU)
    events = []
    trainer.on_event = events.append
    teacher = trainer.teacher  # offline training lets go of it once the cache is open
    trainer.before_training(0)
    assert (cache / META_FILE).is_file() and not (tmp_path / ".cache.partial").exists()
    (built,) = events
    assert built.build_seconds is not None and built.rows == len(trainer.sampler.tokens) - 1

    # the rows read for a micro-batch are what the teacher says about those windows, to fp16 precision
    for step in (0, 3):
        inputs, targets = trainer.micro_batch(step, 1)
        values, indices, normalizer = trainer._cached_teacher
        with torch.no_grad():
            logits = teacher(inputs, document_ids=trainer._document_ids(inputs))
            top = logits.topk(16, dim=-1)
            student = torch.randn(*inputs.shape, 1024)
        assert torch.equal(indices[..., :4], top.indices[..., :4])  # the clear leaders: ties only lower down
        torch.testing.assert_close(values.float(), top.values, atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(normalizer, torch.logsumexp(logits / 2.0, dim=-1), atol=1e-4, rtol=1e-5)
        exact = torch.logsumexp(logits / 2.0, dim=-1)
        online = top_k_distillation_loss(student, top.values, top.indices, exact, targets, 0.5, 2.0)
        offline = top_k_distillation_loss(student, values, indices, normalizer, targets, 0.5, 2.0)
        torch.testing.assert_close(offline, online, atol=1e-3, rtol=1e-3)


def test_offline_training_never_runs_the_teacher_and_reuses_or_refuses_its_cache(
    short_pipeline, tiny_checkpoint, tmp_path
):
    import json

    cache = tmp_path / "cache"
    trainer = DistillTrainer(
        recipe_from_dict(offline_dict(short_pipeline, tiny_checkpoint, tmp_path / "a", cache)), CPU
    )
    trainer.before_training(0)  # built here; from now on the teacher is gone
    assert trainer.teacher is None and trainer.teacher_parameters == 205_120
    result = trainer.fit()
    assert math.isfinite(result.val_loss)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [record for record in records if record["event"] == "teacher_cache"]
    assert event["build_seconds"] is None and event["top_k"] == 16  # fit reused the cache built above

    stale = offline_dict(short_pipeline, tiny_checkpoint, tmp_path / "b", cache, top_k=8)
    with pytest.raises(UserError, match="was built for another top_k; remove it"):
        DistillTrainer(recipe_from_dict(stale), CPU).before_training(0)
