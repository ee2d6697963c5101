"""TOML recipes -> validated, typed run configuration. A recipe is the single source of truth for a run."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal, get_type_hints

import tomli_w
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)

from llmctl.data.clean import CleaningRules
from llmctl.data.filters import FilterRules
from llmctl.errors import UserError
from llmctl.model.config import ModelConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ModelShape(Section):
    """Behaviour of the [model] section; its fields are ModelConfig's own (see ModelSection)."""

    def to_config(
        self, bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int | None = 3
    ) -> ModelConfig:
        try:
            return ModelConfig(
                **self.model_dump(),
                bos_token_id=bos_token_id,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
            )
        except ValueError as error:
            raise UserError(f"recipe [model]: {error}") from None


def _model_fields() -> dict[str, Any]:
    """ModelConfig's fields, types, constraints and defaults: the shape is declared once, in llmctl.model."""
    hints = get_type_hints(ModelConfig, include_extras=True)
    return {
        field.name: (hints[field.name], field.default)
        for field in dataclasses.fields(ModelConfig)
        if field.name not in TOKEN_ID_FIELDS
    }


ModelSection = create_model("ModelSection", __base__=ModelShape, **_model_fields())


class DataSection(Section):
    corpus: str | None = Field(None, description="a `llmctl corpus build` output directory")
    tokens: str | None = Field(None, description="a `llmctl tokenize encode` output directory")
    tokenizer: str | None = Field(None, description="a sentencepiece .model file")
    filters: FilterRules = FilterRules()
    cleaning: CleaningRules = CleaningRules()
    executor_settings: dict[str, str | int | float | bool] = Field(
        {},
        description="`--executor`: datatrove's executor settings (start_method; partition, time; cpus_per_task...), "
        "and llmctl's own: address (ray), poll_seconds (slurm)",
    )


class TrainSection(Section):
    steps: int = Field(1000, gt=0, description="optimizer steps; with max_minutes, the most to run")
    max_minutes: float | None = Field(
        None,
        ge=0,
        description="wall-clock budget: the schedule follows the share spent; stops and saves at the end "
        "(0: none, the steps decide)",
    )
    micro_batch_size: int = Field(8, gt=0, description="sequences per device per forward pass")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step, over all devices")
    seq_len: int | None = Field(
        None,
        gt=1,
        description="default: model.max_seq_len; a finetune on examples: its longest example, rounded up to 64",
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 1337
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(200, ge=0, description="0: only at the end")
    eval_batches: int = Field(20, gt=0)
    compile: bool = False
    activation_checkpointing: bool = False
    document_masking: bool = Field(
        True, description="a token attends only to its own document within a training window"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    z_loss: float = Field(0.0, ge=0)
    sample_prompts: list[str] = []
    sample_tokens: int = Field(64, ge=0)
    sample_every: int = Field(
        0, ge=0, description="also sample every N steps for the monitor (0: only at the end; not under FSDP)"
    )
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"],
        description="where step and eval numbers go besides metrics.jsonl; mlflow: MLFLOW_TRACKING_URI or "
        "runs/mlflow.db, the store `llmctl models` uses",
    )


REFERENCE_WIDTH = 2048
REFERENCE_LR = {"adamw": 2e-4, "muon": 6.75e-4}


def width_scaled_lr(d_model: int, optimizer: str = "adamw") -> float:
    """The peak learning rate a recipe gets when it sets none: at d_model 2048, 2e-4 for AdamW and 6.75e-4 for
    Muon (its update RMS-matched to AdamW's), scaled by 1/width (how muP scales Adam's rate for hidden
    matrices). At d_model 384 that is 1.07e-3 for AdamW, the best of 3e-4, 1e-3 and 1.6e-3 on the quality
    benchmark, and 3.6e-3 for Muon, the best of 1.07e-3, 1.6e-3, 2.4e-3, 3.6e-3, 5.4e-3 and 8e-3 on the two
    held-out sets (benchmarks/RESULTS.md)."""
    return float(f"{REFERENCE_LR[optimizer] * REFERENCE_WIDTH / d_model:.3g}")


class OptimSection(Section):
    name: Literal["muon", "adamw"] = Field(
        "muon",
        description="muon: Muon (orthogonalised momentum) for the hidden weight matrices and AdamW for the "
        "embeddings, head and norms, at AdamW's lr and weight decay; adamw: AdamW for all (needed under FSDP)",
    )
    lr: float | None = Field(
        None,
        gt=0,
        validation_alias=AliasChoices("lr", "learning_rate"),
        description="peak learning rate; default 2e-4 (adamw) or 6.75e-4 (muon) x 2048 / model.d_model",
    )
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")
    decay_embeddings: bool = False
    embedding_lr_scale: float | None = Field(
        None,
        gt=0,
        description="the token embedding's share of the lr (x lr); default 30, or 10 when it is tied to the "
        "LM head; finetuning defaults to 1",
    )
    head_lr_scale: float = Field(
        3.0, gt=0, description="an untied LM head's share of the lr (x lr); finetuning defaults to 1"
    )
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="muon: its momentum (Nesterov)")


class ScheduleSection(Section):
    kind: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warmup; default: warmup_fraction of the run"
    )
    warmup_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="the warmup's share of train.steps (of train.max_minutes on a time budget)",
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the final fraction of steps that decays")


class CheckpointSection(Section):
    dir: str | None = Field(None, description="run directory; default runs/<recipe name>")
    every: int = Field(500, ge=0, description="0: only at the end")
    keep_last: int = Field(3, gt=0)


class DistributedSection(Section):
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoraSection(Section):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0, description="updates are scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | str = Field(
        default_factory=lambda: list(ALL_LINEAR),
        description="module name suffixes (q_proj, ...) or one regular expression over full module names",
    )


class FinetuneSection(Section):
    base: str | None = Field(None, description="an llmctl checkpoint or a Hugging Face Llama directory")
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraSection = LoraSection()
    layer_lr_decay: float = Field(
        1.0,
        gt=0,
        le=1,
        description="full: layer i of n trains at lr x decay^(n - i); embeddings at decay^(n+1)",
    )
    keep_sparsity: bool = Field(
        False, description="full: weights that are zero in the base stay zero (recovery after `llmctl prune`)"
    )
    examples: str | None = Field(None, description="chat/instruction JSONL; without it, data.tokens is used")
    val_examples: str | None = Field(None, description="held-out JSONL; default: val_fraction of examples")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    packing: bool = Field(True, description="several short examples per window, attention kept inside each")
    overlong: Literal["truncate", "skip"] = Field("skip", description="examples longer than the context")
    chat_template: str | None = Field(
        None,
        description="a Jinja chat template file for `examples` (default: the base's own, or llmctl's markers); "
        "written into each checkpoint as chat_template.jinja",
    )


class DistillSection(Section):
    teacher: str | None = Field(None, description="a checkpoint (or run directory) using the same tokenizer")
    alpha: float = Field(
        0.5, ge=0, le=1, description="loss = alpha x T^2 x KL(teacher || student) + (1 - alpha) x CE"
    )
    temperature: float = Field(2.0, gt=0, description="T: both distributions are softened by it")
    teacher_cache: str | None = Field(
        None,
        description="offline mode: a directory of the teacher's top-k logits for the training split, built "
        "on the first run and reused after, so training never runs the teacher",
    )
    top_k: int = Field(32, ge=1, description="offline mode: how many of the teacher's largest logits to keep")


class Recipe(Section):
    name: str = "run"
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    schedule: ScheduleSection = ScheduleSection()
    checkpoint: CheckpointSection = CheckpointSection()
    distributed: DistributedSection = DistributedSection()
    finetune: FinetuneSection = FinetuneSection()
    distill: DistillSection = DistillSection()

    @model_validator(mode="after")
    def default_learning_rates(self) -> Recipe:
        """Resolved here, so the run's saved recipe records the rates it trained with. A finetune's model
        shape is its base's, known only once the base is read (`train.finetune.finetune_recipe` resolves
        them)."""
        if self.finetune.base:
            return self
        if self.optim.lr is None:
            self.optim.lr = width_scaled_lr(self.model.d_model, self.optim.name)
        if self.optim.embedding_lr_scale is None:  # a tied embedding is the head too, which wants less
            self.optim.embedding_lr_scale = 10.0 if self.model.tie_embeddings else 30.0
        return self

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.max_seq_len

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.dir or f"runs/{self.name}")

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (following `extends`), apply `section.key=value` overrides, validate."""
    path = Path(path)
    raw = _read_with_extends(path, seen=())
    raw.setdefault("name", path.stem)
    for override in overrides:
        apply_override(raw, override)
    return recipe_from_dict(raw, source=str(path))


def recipe_from_dict(raw: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise UserError(f"{source}: {describe_errors(error)}") from None


def describe_errors(error: ValidationError) -> str:
    """All problems on one line, each with its full key path and, for unknown keys, a did-you-mean."""
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            hint = _suggest(item["loc"])
            problems.append(f"{key}: unknown key" + (f" (did you mean {hint}?)" if hint else ""))
        else:
            problems.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(problems)


def _known_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> dict[str, str]:
    """Every valid dotted key (and accepted alias), mapped to its canonical dotted name."""
    keys: dict[str, str] = {}
    for name, field in model.model_fields.items():
        canonical = prefix + name
        names = [name]
        if isinstance(field.validation_alias, AliasChoices):
            names += [alias for alias in field.validation_alias.choices if isinstance(alias, str)]
        for alias in names:
            keys[prefix + alias] = canonical
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(_known_keys(annotation, canonical + "."))
    return keys


def _suggest(loc: tuple) -> str | None:
    """The closest valid key: first among the section's own keys, then the same name in another section."""
    known = _known_keys()
    section, leaf = ".".join(str(part) for part in loc[:-1]), str(loc[-1])
    for candidates, cutoff in (
        ([key for key in known if key.rpartition(".")[0] == section], 0.6),
        (list(known), 0.75),  # the right key in the wrong section, e.g. train.lr -> optim.lr
    ):
        by_leaf = {key.rpartition(".")[2]: key for key in candidates}
        match = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=cutoff)
        if match:
            return known[by_leaf[match[0]]]
    return None


def _read_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in seen:
        raise UserError(f"{path}: `extends` forms a cycle ({' -> '.join(str(p) for p in (*seen, resolved))})")
    if not path.is_file():
        raise UserError(f"recipe not found: {path} (see recipes/ for examples)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: invalid TOML: {error}") from None
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_with_extends(path.parent / parent, seen=(*seen, resolved))
    base.pop("name", None)  # a child recipe is its own run, named after its own file unless it says otherwise
    return deep_merge(base, raw)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `section.key=value` in a raw recipe dict; the value is read as TOML, else taken as a string."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {override!r}: expected section.key=value, e.g. --set optim.lr=3e-4")
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: --set data.tokens=runs/demo/tokens
    *sections, leaf = key.strip().split(".")
    node = raw
    for section in sections:
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {override!r}: {section} is a value, not a section")
        node = child
    node[leaf] = value
