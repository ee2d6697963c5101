"""What a recipe will cost before it runs: parameters, tokens, FLOPs and memory per device."""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.errors import UserError
from llmctl.recipe import Recipe

GIB = 1024**3


@dataclass(frozen=True)
class TrainingPlan:
    parameters: int
    world_size: int
    strategy: str
    precision: str
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    steps: int
    tokens_per_step: int
    flops_per_token: int
    memory: dict[str, float]  # bytes per device, by component
    trainable: int  # the parameters with gradients and optimizer state: all, or a LoRA adapter's

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def memory_per_device(self) -> float:
        return sum(self.memory.values())


def resolve_strategy(recipe: Recipe, world_size: int) -> str:
    strategy = recipe.distributed.strategy
    if strategy == "auto":
        return "none" if world_size == 1 else "ddp"
    return strategy


def grad_accum_steps(recipe: Recipe, world_size: int) -> int:
    per_step = recipe.train.micro_batch_size * world_size
    if recipe.train.global_batch_size % per_step:
        raise UserError(
            f"train.global_batch_size ({recipe.train.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x devices ({recipe.train.micro_batch_size} x {world_size} = {per_step})"
        )
    return recipe.train.global_batch_size // per_step


def make_plan(
    recipe: Recipe,
    world_size: int = 1,
    *,
    seq_len: int | None = None,
    adapter: int = 0,
    base_bytes: int | None = None,
) -> TrainingPlan:
    """The plan of training every weight at the recipe's sequence length, or of a finetune: `seq_len` its
    windows, `adapter` the parameters of a LoRA adapter (the base then frozen: no gradients, optimizer state or
    weight-gradient FLOPs for it), `base_bytes` a quantized base's own size (QLoRA)."""
    config = recipe.model.to_config()
    parameters = config.num_parameters()
    strategy = resolve_strategy(recipe, world_size)
    seq, micro = seq_len or recipe.seq_len, recipe.train.micro_batch_size
    if seq > config.max_seq_len:
        raise UserError(f"train.seq_len ({seq}) exceeds model.max_seq_len ({config.max_seq_len})")
    if recipe.optim.name == "muon" and strategy == "fsdp":
        raise UserError(
            'optim.name = "muon" needs every weight matrix whole, and FSDP shards them: '
            'set optim.name = "adamw", or distributed.strategy = "ddp"'
        )
    shards = world_size if strategy == "fsdp" else 1
    trainable = adapter or parameters
    # fp32 master weights and gradients, and the optimizer's fp32 moments: AdamW keeps two per parameter,
    # Muon one per hidden-matrix weight (AdamW's two for the embeddings). FSDP shards all of them.
    lookup_tables = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    if recipe.optim.name == "adamw":
        moments = 8 * trainable
    else:
        moments = 4 * trainable + (0 if adapter else 4 * lookup_tables)
    memory = {
        "weights": ((4 * parameters if base_bytes is None else base_bytes) + 4 * adapter) / shards,
        "gradients": 4 * trainable / shards,
        "optimizer": moments / shards,
    }
    activation_bytes = 2 if recipe.train.precision in ("bf16", "fp16") else 4
    tokens = micro * seq
    # Per layer and token, a pre-norm block keeps ~17 d_model-sized tensors for backward when attention
    # runs as a fused (flash) kernel; checkpointing keeps only the block input plus one layer's worth.
    per_layer = 17 * tokens * config.d_model * activation_bytes
    if recipe.train.activation_checkpointing:
        memory["activations"] = config.n_layer * tokens * config.d_model * activation_bytes + per_layer
    else:
        memory["activations"] = config.n_layer * per_layer
    # Logits in the compute dtype, plus fp32 copies for the loss and its gradient.
    memory["logits"] = tokens * config.vocab_size * (activation_bytes + 8)
    if strategy == "fsdp":
        # one unsharded layer (weights + gradients) in flight at a time, in the compute dtype
        layer = (parameters - config.vocab_size * config.d_model) / config.n_layer
        memory["fsdp buffers"] = 2 * 2 * layer * activation_bytes
    return TrainingPlan(
        parameters=parameters,
        world_size=world_size,
        strategy=strategy,
        precision=recipe.train.precision,
        micro_batch_size=micro,
        grad_accum_steps=grad_accum_steps(recipe, world_size),
        seq_len=seq,
        steps=recipe.train.steps,
        tokens_per_step=recipe.train.global_batch_size * seq,
        flops_per_token=config.flops_per_token(seq, frozen=bool(adapter)) + 6 * adapter,
        memory=memory,
        trainable=trainable,
    )
