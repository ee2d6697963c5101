"""`llmctl up`'s plan, shown before any work: each stage with its estimated minutes and disk, training taking
what the others leave of the budget, from this machine's measured training speed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import UserError
from llmctl.pipeline import budget
from llmctl.pipeline.budget import PlannedStage
from llmctl.pipeline.delivery import HELDOUT_TOKENS, QUANTIZATION_TOKENS
from llmctl.pipeline.request import UpRequest, gguf_parameters, is_gguf
from llmctl.pipeline.settings import UpSettings
from llmctl.pipeline.sizing import choose_shape, vocabulary_size


@dataclass(frozen=True)
class Plan:
    stages: list[PlannedStage]
    flops_per_second: float  # measured: what sizing and the estimates use

    def seconds_after_training(self) -> float:
        """The planned seconds of the stages after training: evaluation, quantization, registration."""
        before = ("import", "corpus", "tokenizer", "tokens", "evaluate-base")
        return sum(stage.seconds for stage in self.stages if not stage.training and stage.name not in before)


def vocabulary_for(settings: UpSettings, text_bytes: int) -> int:
    return int(settings.tokenizer.get("vocab_size", vocabulary_size(text_bytes)))


def make_plan(request: UpRequest, document_bytes: int, started: float) -> Plan:
    """Refused when the budget leaves less than MIN_TRAIN_SECONDS to train: before measuring the machine
    when the data stages alone leave too little. `started`: when the budget's clock began."""
    from llmctl.pipeline.sizing import measured_flops_per_second

    settings = request.settings
    data = budget.data_stage_seconds(document_bytes, tokenizer=request.base is None)
    if is_gguf(request.base):
        data["import"] = budget.import_seconds(Path(request.base).stat().st_size)
    check_budget(request, {**data, "register": budget.REGISTER_SECONDS}, started)
    vocab = vocabulary_for(settings, document_bytes)
    flops = measured_flops_per_second(vocab)
    heldout = min(int(document_bytes * settings.corpus_options().val_fraction), 4 * HELDOUT_TOKENS)
    parameters = estimated_parameters(request, vocab, document_bytes, sum(data.values()), flops)
    after = {
        "evaluate": budget.evaluation_seconds(heldout, parameters, flops),
        "quantize": budget.quantize_seconds(min(heldout, 4 * QUANTIZATION_TOKENS), parameters, flops)
        if settings.quantize
        else 0.0,
        "register": budget.REGISTER_SECONDS,
    }
    if request.base is not None:
        after["evaluate-base"] = after["evaluate"]
    chat = settings.chat
    train, chat_seconds = budget.training_split(
        check_budget(request, {**data, **after}, started),
        chat.share if chat.enabled else 0.0,
        60 * chat.min_minutes,
    )
    return Plan(plan_rows(request, document_bytes, data, after, train, chat_seconds, parameters), flops)


def check_budget(request: UpRequest, other_stages: dict[str, float], started: float) -> float:
    """The seconds the budget leaves to train after `other_stages`, or one line saying it is too small."""
    others = sum(other_stages.values()) + time.perf_counter() - started
    train_seconds = request.budget_seconds - others
    if train_seconds < budget.MIN_TRAIN_SECONDS:
        needed = (others + budget.MIN_TRAIN_SECONDS) / 60
        raise UserError(
            f"--budget {request.budget_seconds / 60:g}m leaves {max(train_seconds, 0):.0f}s to train "
            f"after the other stages; give at least --budget {needed:.1f}m"
        )
    return train_seconds


def estimated_parameters(
    request: UpRequest, vocab: int, document_bytes: int, data_seconds: float, flops: float
) -> int:
    if request.base is not None:
        return base_parameters(request.base)
    seconds = max(request.budget_seconds * 0.8 - data_seconds, 1.0)
    return choose_shape(vocab, seconds, document_bytes // budget.BYTES_PER_TOKEN, flops).parameters


def base_parameters(base: Path) -> int:
    if is_gguf(base):
        return gguf_parameters(base)
    from llmctl.model.hf_format import read_config

    return read_config(Path(base)).num_parameters()


def plan_rows(
    request: UpRequest,
    text: int,
    data: dict[str, float],
    after: dict[str, float],
    train: float,
    chat: float,
    parameters: int,
) -> list[PlannedStage]:
    """Disk: the corpus about the documents' size, the tokens half of it; a training run two checkpoints of
    weights and optimizer moments (a LoRA run's adapters are small, its merged copy is not)."""
    rows = []
    if "import" in data:
        rows.append(
            PlannedStage("import", "the GGUF file as a checkpoint (fp32)", data["import"], 4 * parameters)
        )
    what = "clean, filter, de-duplicate and split the documents"
    rows.append(PlannedStage("corpus", what, data["corpus"], text))
    if "tokenizer" in data:
        what = "a sentencepiece vocabulary sized for the corpus"
        rows.append(PlannedStage("tokenizer", what, data["tokenizer"], 1 << 20))
    rows.append(PlannedStage("tokens", "encode both splits", data["tokens"], text // 2))
    if request.base is not None:
        what = "held-out perplexity of the base, to compare against"
        rows.append(PlannedStage("evaluate-base", what, after["evaluate-base"], 1 << 20))
    if request.base is None:
        rows.append(PlannedStage("train", "pretrain the shape the time allows", train, 36 * parameters, True))
    else:
        what = "continued pretraining of the base with LoRA"
        rows.append(PlannedStage("adapt", what, train, 4 * parameters, True))
    if chat:
        what = "LoRA on starter instructions made from the corpus"
        rows.append(PlannedStage("chat", what, chat, 4 * parameters, True))
    rows.append(PlannedStage("evaluate", "held-out perplexity and bits per byte", after["evaluate"], 1 << 20))
    if after["quantize"]:
        what = "int8, kept when faster at <= 1% perplexity"
        rows.append(PlannedStage("quantize", what, after["quantize"], parameters))
    rows.append(PlannedStage("register", "model card, registry version, report", after["register"], 1 << 20))
    return rows
