"""The training recipes `llmctl up` writes (pretraining the chosen shape, LoRA continued pretraining of a
base, LoRA on starter instructions), and one fit that resumes an interrupted run of the same recipe."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llmctl.checkpoint import latest_checkpoint
from llmctl.pipeline.request import TrainingInterrupted
from llmctl.pipeline.sizing import MAX_EPOCHS, MICRO_BATCH, ShapeChoice
from llmctl.recipe import Recipe, deep_merge, recipe_from_dict

if TYPE_CHECKING:
    from llmctl.train.distributed import DistributedContext

ADAPT_CONTEXT = 512  # continued pretraining windows on a CPU, whatever the base's context
ADAPTER_CHECKPOINT_EVERY = 20  # steps: LoRA steps are short, and an adapter checkpoint is small
UNBOUNDED_STEPS = 1_000_000  # a finetune on a time budget stops on its clock
CHAT_EPOCHS = 2  # passes over the starter instructions at most


def pretrain_recipe(
    name: str, choice: ShapeChoice, vocab: int, seconds: float, paths: dict[str, Path], train_tokens: int
) -> dict:
    """The chosen shape for `seconds`, or for at most MAX_EPOCHS passes over the data if that comes first;
    `paths`: corpus, tokens, tokenizer and the run directory."""
    step_tokens = MICRO_BATCH * choice.shape.max_seq_len
    every = checkpoint_every(choice.tokens_per_second, step_tokens)
    return {
        "name": name,
        "model": choice.shape.model_settings(vocab),
        "data": {key: str(paths[key]) for key in ("corpus", "tokens", "tokenizer")},
        "train": {
            "steps": max(1, MAX_EPOCHS * train_tokens // step_tokens),
            "max_minutes": seconds / 60,
            "micro_batch_size": MICRO_BATCH,
            "global_batch_size": MICRO_BATCH,
            "eval_every": every,
            "eval_batches": 10,
        },
        "checkpoint": {"dir": str(paths["run"]), "every": every, "keep_last": 2},
    }


def adapt_recipe(name: str, base: Path, seconds: float, paths: dict[str, Path], context: int) -> dict:
    """LoRA on the base over the corpus's tokens (encoded with the base's tokenizer) for `seconds`."""
    return {
        "name": name,
        "finetune": {"base": str(base), "method": "lora"},
        "data": {key: str(paths[key]) for key in ("corpus", "tokens")},
        "train": {
            "steps": UNBOUNDED_STEPS,
            "max_minutes": seconds / 60,
            "seq_len": min(ADAPT_CONTEXT, context),
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "eval_every": 0,
            "eval_batches": 5,
        },
        "checkpoint": {"dir": str(paths["run"]), "every": ADAPTER_CHECKPOINT_EVERY, "keep_last": 1},
    }


def chat_recipe(name: str, model: Path, examples: Path, count: int, seconds: float, run: Path) -> dict:
    """LoRA on the `count` starter instructions, rendered with the model's own chat template (or llmctl's),
    for `seconds` or CHAT_EPOCHS passes, whichever ends first: on a small model, time enough for 17 passes
    over 400 examples learnt them by heart (held-out instruction loss 7.4) and took its held-out perplexity
    on the documents from 33 to 888."""
    batch = 8
    return {
        "name": f"{name}-chat",
        "finetune": {"base": str(model), "method": "lora", "examples": str(examples)},
        "train": {
            "steps": max(10, math.ceil(CHAT_EPOCHS * count / batch)),
            "max_minutes": seconds / 60,
            "micro_batch_size": batch,
            "global_batch_size": batch,
            "eval_every": 0,
            "eval_batches": 4,
        },
        "checkpoint": {"dir": str(run), "every": ADAPTER_CHECKPOINT_EVERY, "keep_last": 1},
    }


def can_chat(model: Path) -> bool:
    """Whether the model has a chat format to finetune on: its own template, or llmctl's markers in its
    vocabulary (a tokenizer llmctl trained)."""
    from llmctl.data.chat_format import open_chat_format
    from llmctl.data.tokenizer import open_tokenizer
    from llmctl.errors import UserError

    try:
        open_chat_format(model, open_tokenizer(model))
    except UserError:
        return False
    return True


def with_overrides(raw: dict, overrides: dict, finetune: bool) -> Recipe:
    """The recipe with the user's `--set` sections over it, validated (a finetune's shape from its base)."""
    recipe = recipe_from_dict(deep_merge(raw, overrides), source="llmctl up --set")
    if not finetune:
        return recipe
    from llmctl.train.finetune import finetune_recipe

    return finetune_recipe(recipe)


def fit(recipe: Recipe, again: bool, context: DistributedContext, on_event: Callable[[object], None]) -> dict:
    """Train in this process, resuming when an earlier attempt of this recipe (`again`) left a checkpoint."""
    if recipe.finetune.base:
        from llmctl.train.finetune import FinetuneTrainer as TrainerClass
    else:
        from llmctl.train.trainer import Trainer as TrainerClass

    resume = again and latest_checkpoint(recipe.run_dir) is not None
    trainer = TrainerClass(recipe, context, on_event=on_event)
    result = trainer.fit(resume="auto" if resume else None, overwrite=not resume)
    if result.interrupted:
        raise TrainingInterrupted(f"training stopped at step {result.final_step}, after its checkpoint")
    loss = f", validation loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    summary = f"{result.final_step:,} steps{loss}"
    return {"checkpoint": str(result.checkpoint), "steps": result.final_step, "summary": summary}


def checkpoint_every(tokens_per_second: float, step_tokens: int) -> int:
    """Steps between checkpoints: about two minutes of training, so an interruption loses at most that."""
    return max(10, int(120 * tokens_per_second / step_tokens))


def shape_summary(choice: ShapeChoice, seconds: float) -> str:
    shape = choice.shape
    return (
        f"d_model {shape.d_model}, {shape.n_layer} layers ({choice.parameters / 1e6:.1f}M parameters), about "
        f"{choice.tokens / 1e6:.1f}M tokens in {seconds / 60:.1f} min: {choice.reason}"
    )
