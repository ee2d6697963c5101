"""`llmctl finetune`: the one trainer, started from a base model (an llmctl checkpoint or a Hugging Face Llama
directory), training LoRA adapters or every weight, on chat/instruction examples or plain domain text.

Only what differs from pretraining lives here: where the model and data come from, which parameters train at
which rate, and what a checkpoint holds (a PEFT adapter directory for LoRA). Loop, metrics, resume and
torchrun are the trainer's.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from llmctl.adapters import adapter_state, add_lora, load_adapter_weights, lora_config
from llmctl.checkpoint import checkpoint_problem, model_directory, open_model, save_checkpoint
from llmctl.data.chat_format import ChatFormat, open_chat_format
from llmctl.data.instructions import (
    Example,
    example_window,
    examples_fingerprint,
    pack_examples,
    read_examples,
    tokenize_example,
)
from llmctl.data.loader import ExampleSampler, example_validation_batches
from llmctl.data.tokenizer import open_tokenizer
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.digests import weights_sha256
from llmctl.errors import UserError
from llmctl.model import Transformer
from llmctl.model.hf_format import CONFIG_FILE, read_config, read_quantization_config
from llmctl.recipe import ModelSection, Recipe, recipe_from_dict, width_scaled_lr
from llmctl.train.distributed import DistributedContext
from llmctl.train.events import EventHandler
from llmctl.train.optim import is_hidden_matrix
from llmctl.train.plan import TrainingPlan, make_plan
from llmctl.train.trainer import Trainer

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def finetune_recipe(recipe: Recipe) -> Recipe:
    """The recipe with its base's model shape and, when it sets none, the method's learning rate (the
    pretraining rate for LoRA's small update matrices, a tenth of it for full finetuning) and AdamW with the
    embedding at that rate."""
    spec = recipe.finetune
    if not spec.base:
        raise UserError(
            "recipe finetune.base is not set: point it at a checkpoint or a Hugging Face Llama directory"
        )
    base = model_directory(Path(spec.base))  # the newest checkpoint of a run directory, recorded as the base
    if base.is_dir():
        problem = checkpoint_problem(base)
    else:
        problem = "it is a file; name the checkpoint directory" if base.exists() else "it does not exist"
    if problem or not (base / CONFIG_FILE).is_file():
        raise UserError(f"finetune.base {base}: {problem or 'it is an adapter, not a model'}")
    try:
        config = read_config(base)
    except (ValueError, KeyError, json.JSONDecodeError) as error:
        raise UserError(f"finetune.base {base}: cannot use its {CONFIG_FILE}: {error}") from None
    shape = {name: getattr(config, name) for name in ModelSection.model_fields}
    clashes = [
        f"model.{key} = {getattr(recipe.model, key)} (the base has {shape[key]})"
        for key in recipe.model.model_fields_set
        if getattr(recipe.model, key) != shape[key]
    ]
    if clashes:
        raise UserError(f"a finetune takes its model shape from finetune.base; remove {', '.join(clashes)}")
    raw = recipe.model_dump(mode="json", exclude_none=True)
    raw["model"] = shape
    raw["finetune"]["base"] = str(base)
    if recipe.optim.lr is None:
        rate = width_scaled_lr(config.d_model)
        raw["optim"]["lr"] = rate / 10 if spec.method == "full" else rate
    for key, finetuning_default in (("name", "adamw"), ("embedding_lr_scale", 1.0), ("head_lr_scale", 1.0)):
        if key not in recipe.optim.model_fields_set:  # pretraining's defaults are measured from scratch only
            raw["optim"][key] = finetuning_default
    return recipe_from_dict(raw, source=f"recipe {recipe.name}")


def examples_chat_format(recipe: Recipe, tokenizer: Tokenizer) -> ChatFormat:
    """How the finetune's examples are rendered: `finetune.chat_template`, else the base's own template (or
    llmctl's markers)."""
    spec = recipe.finetune
    return open_chat_format(
        Path(spec.base), tokenizer, Path(spec.chat_template) if spec.chat_template else None
    )


def tokenized_examples(
    recipe: Recipe, tokenizer: Tokenizer, chat: ChatFormat
) -> tuple[list[Example], list[Example]]:
    """The finetune's training and held-out examples, tokenized: `val_examples`, or `val_fraction` of the
    examples drawn with the run's seed."""
    spec = recipe.finetune
    examples = read_examples(Path(spec.examples))
    if spec.val_examples:
        held_out = read_examples(Path(spec.val_examples))
    else:
        random.Random(recipe.train.seed).shuffle(examples)
        count = max(1, round(len(examples) * spec.val_fraction)) if spec.val_fraction else 0
        if count >= len(examples):
            raise UserError(
                f"{spec.examples} has too few examples to hold {count} out; add more or set val_examples"
            )
        held_out, examples = examples[:count], examples[count:]
    if not held_out:
        raise UserError("no held-out examples: set finetune.val_fraction above 0 or finetune.val_examples")
    return (
        [tokenize_example(messages, tokenizer, chat) for messages in examples],
        [tokenize_example(messages, tokenizer, chat) for messages in held_out],
    )


def finetune_plan(recipe: Recipe, world_size: int = 1) -> TrainingPlan:
    """The dry run's plan of a recipe resolved by `finetune_recipe`, as the trainer will run it: windows as long
    as its examples need (what `open_data` settles), and under LoRA the adapter alone with gradients and
    optimizer state (counted on a meta-device model, so no weights are read); under QLoRA the base weighs
    its quantized files."""
    spec, base = recipe.finetune, Path(recipe.finetune.base)
    seq_len = recipe.seq_len
    if spec.examples and recipe.train.seq_len is None:
        tokenizer = open_tokenizer(base)
        examples, held_out = tokenized_examples(recipe, tokenizer, examples_chat_format(recipe, tokenizer))
        seq_len = example_window(examples + held_out, seq_len)
    if spec.method == "full":
        return make_plan(recipe, world_size, seq_len=seq_len)
    lora = spec.lora
    with torch.device("meta"):
        model = Transformer(recipe.model.to_config())
        add_lora(model, lora_config(lora.rank, lora.alpha, lora.dropout, lora.targets))
    adapter = sum(param.numel() for param in model.parameters() if param.requires_grad)
    quantized = (
        sum(path.stat().st_size for path in base.glob("*.safetensors")) if spec.method == "qlora" else None
    )
    return make_plan(recipe, world_size, seq_len=seq_len, adapter=adapter, base_bytes=quantized)


@dataclass(frozen=True)
class ExamplesSummary:
    examples: int
    truncated: int
    skipped: int
    windows: int
    val_windows: int


def keep_zeros(model: Transformer) -> None:
    """Mask the gradient of every matrix weight that is zero, so a pruned model stays pruned: with no gradient
    AdamW never moves such a weight (its moments stay zero, and decay scales zero to zero)."""
    for name, param in model.named_parameters():
        if is_hidden_matrix(name, param):
            kept = param.detach() != 0
            param.register_hook(lambda grad, kept=kept: grad * kept)


class FinetuneTrainer(Trainer):
    """Give it a recipe resolved by `finetune_recipe`."""

    def __init__(
        self, recipe: Recipe, context: DistributedContext, on_event: EventHandler | None = None
    ) -> None:
        spec = recipe.finetune
        quantized = read_quantization_config(Path(spec.base)) is not None
        if spec.method == "qlora" and not quantized:
            raise UserError(
                f"finetune.method = qlora trains LoRA over a quantized base and {spec.base} is not one: make "
                f"it with `llmctl quantize {spec.base} --method int4 --out DIR` and set finetune.base to DIR"
            )
        if spec.method != "qlora" and quantized:
            raise UserError(
                f'finetune.base {spec.base} is quantized: set finetune.method = "qlora" to train LoRA over it '
                "(full finetuning needs the float checkpoint)"
            )
        if spec.keep_sparsity and (spec.method != "full" or recipe.distributed.strategy == "fsdp"):
            raise UserError(
                'finetune.keep_sparsity applies to method = "full" with distributed.strategy "ddp" or "none"'
            )
        if spec.keep_sparsity and recipe.optim.name == "muon":
            raise UserError(
                'finetune.keep_sparsity needs optim.name = "adamw": Muon orthogonalises each step, which moves '
                "the pruned weights whose gradient is masked"
            )
        if spec.method == "qlora" and recipe.distributed.strategy == "fsdp":
            raise UserError(
                'QLoRA trains with distributed.strategy "ddp" or "none": FSDP shards parameters, and a '
                "quantized base is held in buffers it would copy whole to every rank"
            )
        if spec.examples and spec.packing and not recipe.train.document_masking:
            raise UserError(
                "finetune.packing needs train.document_masking = true, so examples never see each other"
            )
        self.base = Path(spec.base)
        self.lora = None
        self.summary: ExamplesSummary | None = None
        super().__init__(recipe, context, on_event)

    # -- data ----------------------------------------------------------------------------------------------

    def open_data(self) -> None:
        tokenizer = self.tokenizer = open_tokenizer(self.base)
        if not self.recipe.finetune.examples:  # continued pretraining on `tokenize encode` files
            super().open_data()
            return
        spec, train = self.recipe.finetune, self.recipe.train
        chat = examples_chat_format(self.recipe, tokenizer)
        tokenized, tokenized_held_out = tokenized_examples(self.recipe, tokenizer, chat)
        if (
            train.seq_len is None
        ):  # windows as long as the longest example needs, not the base's whole context
            self.seq_len = example_window(tokenized + tokenized_held_out, self.seq_len)

        def windows(chosen):
            return pack_examples(chosen, self.seq_len, tokenizer.pad_id, spec.packing, spec.overlong)

        packed, held_out_packed = windows(tokenized), windows(tokenized_held_out)
        self.summary = ExamplesSummary(
            packed.examples, packed.truncated, packed.skipped, len(packed), len(held_out_packed)
        )
        files = [Path(spec.examples), *([Path(spec.val_examples)] if spec.val_examples else [])]
        settings = (
            f"{self.seq_len} {spec.packing} {spec.overlong} {spec.val_fraction} {train.seed} {chat.source}"
        )
        fingerprint = examples_fingerprint(files, tokenizer, settings)
        self.meta = {
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "fingerprint": fingerprint,
        }
        self.sampler = ExampleSampler(packed, train.global_batch_size, train.seed)
        self.val_batches = example_validation_batches(
            held_out_packed,
            train.micro_batch_size,
            train.eval_batches,
            self.context.rank,
            self.context.world_size,
        )

    # -- model ---------------------------------------------------------------------------------------------

    def build_model(self) -> Transformer:
        model = open_model(self.base, device=self.context.device).train()
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise UserError(
                f"{self.base}: the tokenizer has {self.tokenizer.vocab_size} pieces but the model "
                f"{model.config.vocab_size} embeddings"
            )
        for param in model.parameters():
            param.data = param.data.float()  # a bf16/fp16 download trains in fp32 master weights
        spec = self.recipe.finetune
        if spec.keep_sparsity:
            keep_zeros(model)
        if spec.method in ("lora", "qlora"):  # qlora: the base's quantized layers stay frozen under LoRA
            lora = spec.lora
            config = lora_config(lora.rank, lora.alpha, lora.dropout, lora.targets, str(self.base.resolve()))
            self.lora = add_lora(model, config)
        return model

    def _flops_per_token(self) -> float:
        """LoRA's frozen base computes no weight gradients: 4 FLOPs per base weight and token, 6 per adapter
        weight; full finetuning is pretraining's count."""
        if self.lora is None:
            return super()._flops_per_token()
        adapter = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return self.model.config.flops_per_token(self.seq_len, frozen=True) + 6 * adapter

    def lr_scale(self, name: str) -> float:
        """Layer-wise decay: layer i of n at decay^(n - i), embeddings at decay^(n + 1), head and final norm at 1."""
        decay, layers = self.recipe.finetune.layer_lr_decay, self.model.config.n_layer
        if decay == 1.0:
            return 1.0
        if "embed_tokens" in name:
            return decay ** (layers + 1)
        match = LAYER.search(name)
        return decay ** (layers - int(match.group(1))) if match else 1.0

    # -- checkpoints ---------------------------------------------------------------------------------------

    def model_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model) if self.lora is not None else super().model_state()

    def write_checkpoint(self, directory: Path, model_state: dict, trainer_state: dict) -> Path:
        """A full checkpoint, or a PEFT adapter that records its base's digest; either carries the recipe's
        own chat template where it names one, so the result chats as it was trained."""
        template = self.recipe.finetune.chat_template
        adapter = self.lora is not None
        return save_checkpoint(
            directory,
            self.model.config,
            model_state,
            recipe_toml=self.recipe.to_toml(),
            tokenizer=None if adapter else self.tokenizer,
            trainer_state=trainer_state,
            adapter_config=self.lora.peft_config["default"] if adapter else None,
            adapter_base_sha256=weights_sha256(self.base) if adapter else None,
            chat_template=Path(template).read_text(encoding="utf-8") if template else None,
        )

    def load_weights(self, checkpoint: Path) -> None:
        if self.lora is None:
            super().load_weights(checkpoint)
        else:
            load_adapter_weights(self.model, checkpoint)
