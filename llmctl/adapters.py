"""LoRA adapters in PEFT's own format: added to llmctl's model by PEFT, saved as `adapter_config.json` +
`adapter_model.safetensors` under the weight names `peft.PeftModel.from_pretrained` expects of an HF Llama,
and opened again on a base for chat, serve, eval or merging.

The model's module names are HF Llama's, so PEFT's layers swap in by name and the files are interchangeable.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmctl.atomic import check_output
from llmctl.checkpoint import (
    ADAPTER_BASE_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    RECIPE_FILE,
    is_adapter,
    open_checkpoint,
    save_checkpoint,
)
from llmctl.data.tokenizer_base import Tokenizer
from llmctl.digests import digest_problem, weights_sha256
from llmctl.errors import UserError
from llmctl.model import Transformer
from llmctl.model.hf_format import export_state_dict, read_quantization_config
from llmctl.quantization.quantize import dequantize_model

if TYPE_CHECKING:
    from peft import LoraConfig, LoraModel

PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the base model's own names
DEFAULT_ADAPTER = "default"


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise UserError("LoRA needs the peft package: pip install 'llmctl[finetune]'") from None


def lora_config(
    rank: int, alpha: float, dropout: float, targets: list[str] | str, base: str | None = None
) -> LoraConfig:
    require_peft()
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )


def add_lora(model: Transformer, config: LoraConfig, name: str = DEFAULT_ADAPTER) -> LoraModel:
    """Wrap the targeted linears in place; only the adapter's matrices keep `requires_grad`."""
    from peft import LoraModel

    try:
        return LoraModel(model, config, name)
    except ValueError as error:  # PEFT: no module matched target_modules
        raise UserError(f"LoRA targets {config.target_modules}: {error}".splitlines()[0]) from None


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor as one piece on the host: an FSDP shard (DTensor) is gathered from every rank first."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def adapter_state(model: torch.nn.Module, name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors under the names PEFT writes to adapter_model.safetensors. Under FSDP every rank
    must call it: the adapter's shards are gathered (only those, never the frozen base)."""
    from peft import get_peft_model_state_dict

    adapter = {key: _whole(tensor) for key, tensor in model.state_dict().items() if "lora_" in key}
    state = get_peft_model_state_dict(
        model, state_dict=adapter, adapter_name=name, save_embedding_layers=False
    )  # the embeddings are never resized
    return {PEFT_PREFIX + key: tensor for key, tensor in state.items()}


def read_adapter_config(path: Path) -> LoraConfig:
    require_peft()
    from peft import LoraConfig

    path = Path(path)
    if not is_adapter(path):
        raise UserError(f"not an adapter: {path} has no {ADAPTER_CONFIG_FILE} (llmctl finetune writes one)")
    problem = digest_problem(path)
    if problem:
        raise UserError(f"adapter {path} is damaged: {problem}; use an earlier checkpoint of the run")
    try:
        config = LoraConfig.from_pretrained(str(path))
    except (ValueError, TypeError, json.JSONDecodeError) as error:
        raise UserError(f"{path / ADAPTER_CONFIG_FILE} is not a LoRA adapter config ({error})") from None
    return config


def load_adapter_weights(model: torch.nn.Module, path: Path, name: str = DEFAULT_ADAPTER) -> None:
    """Load an adapter's tensors into a model that already carries the adapter `name`."""
    from peft import set_peft_model_state_dict

    try:
        state = load_file(str(Path(path) / ADAPTER_WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError) as error:
        raise UserError(f"cannot read adapter weights in {path}: {error}") from None
    state = {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state.items()}
    if any(hasattr(param, "full_tensor") for param in model.parameters()):
        _load_sharded(model, path, state, name)
        return
    try:
        result = set_peft_model_state_dict(model, state, adapter_name=name)
    except RuntimeError as error:  # torch's size mismatch: the adapter was trained on a base of another shape
        reason = next(
            (line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error)
        )
        raise UserError(f"adapter {path} does not fit this base ({reason.rstrip('.')})") from None
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"adapter {path} does not fit its base: unexpected weights {unexpected[:3]}")


def _load_sharded(model: torch.nn.Module, path: Path, state: dict[str, torch.Tensor], name: str) -> None:
    """FSDP: whole adapter tensors go through torch's distributed state-dict API, which keeps each rank's
    shard. PEFT's file names lack the adapter name that the model's own names carry."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    named = {}
    for key, tensor in state.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.", f".{part}.{name}.")
        named[key] = tensor
    unexpected = sorted(set(named) - set(model.state_dict()))
    if unexpected:
        raise UserError(f"adapter {path} does not fit its base: unexpected weights {unexpected[:3]}")
    set_model_state_dict(model, named, options=StateDictOptions(full_state_dict=True, strict=False))


BASE_ROW = "__base__"  # PEFT's name for a row of a mixed batch that no adapter touches


class AdapterRouter:
    """Several adapters on one copy of a base: each forward says which adapter each batch row uses, and
    PEFT's LoRA layers apply each adapter to its own rows only (its mixed-batch path)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from peft.tuners.lora import LoraLayer

        self.rows: list[str] | None = None
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.register_forward_pre_hook(self._inject, with_kwargs=True)

    def _inject(self, module, args, kwargs):
        if self.rows is not None:
            kwargs["adapter_names"] = self.rows
        return args, kwargs

    @contextlib.contextmanager
    def route(self, adapters: list[str | None]):
        """Within the block, row i of every forward uses `adapters[i]` (None: the base alone)."""
        self.rows = [name or BASE_ROW for name in adapters]
        try:
            yield
        finally:
            self.rows = None


def check_adapter_base(adapter: Path, base: Path, force: bool = False) -> None:
    """Refuse an adapter on other base weights than those it was trained on (it would load and answer
    nonsense), unless `force`. Adapters that record no base digest (PEFT's own, or older llmctl's) pass."""
    record = Path(adapter) / ADAPTER_BASE_FILE
    if force or not record.is_file():
        return
    try:
        expected = json.loads(record.read_text(encoding="utf-8"))["weights_sha256"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{record} is malformed; it should hold the base's weights_sha256") from None
    actual = weights_sha256(base)
    if actual != expected:
        raise UserError(
            f"adapter {adapter} was trained on base weights sha256 {expected[:12]}…, but {base} holds "
            f"{actual[:12]}…; give the base it was trained on, or pass --force to apply it anyway"
        )


def open_with_adapters(
    base: Path, adapters: dict[str, Path], force: bool = False
) -> tuple[Transformer, Tokenizer, AdapterRouter]:
    """One base checkpoint carrying every named adapter, unmerged, and the router that picks them per row."""
    model, tokenizer = open_checkpoint(base)
    lora = None
    for name, path in adapters.items():
        config = read_adapter_config(path)
        check_adapter_base(path, base, force)
        if lora is None:
            lora = add_lora(model, config, name)
        else:
            lora.peft_config[name] = config
            lora.inject_adapter(model, name)
        load_adapter_weights(model, path, name)
    return model.eval(), tokenizer, AdapterRouter(model)


def base_of(adapter: Path) -> Path:
    """The base model an adapter records (PEFT's base_model_name_or_path)."""
    base = read_adapter_config(adapter).base_model_name_or_path
    if not base:
        raise UserError(f"adapter {adapter} records no base model; pass the base checkpoint explicitly")
    if not Path(base).is_dir():
        raise UserError(f"the base model of adapter {adapter} is not found at {base}; pass it explicitly")
    return Path(base)


def open_adapted(
    adapter: Path,
    base: Path | None = None,
    merge: bool = True,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """A base checkpoint with an adapter applied: merged into the weights (fastest to run), or kept apart.
    Refused on a base whose weights differ from the ones the adapter was trained on, unless `force`."""
    base = Path(base) if base else base_of(adapter)
    config = read_adapter_config(adapter)
    check_adapter_base(adapter, base, force)
    model, tokenizer = open_checkpoint(base, dtype=dtype)
    if merge and read_quantization_config(base) is not None:  # a QLoRA adapter merges into the float weights
        dequantize_model(model)
    lora = add_lora(model, config)
    load_adapter_weights(model, adapter)
    model = lora.merge_and_unload() if merge else lora.model
    return model.eval(), tokenizer


def merge_adapter(
    adapter: Path, out: Path, base: Path | None = None, overwrite: bool = False, force: bool = False
) -> Path:
    """Fold an adapter into its base's weights (the one it records, unless `base`): a plain checkpoint at
    `out`, written atomically with the adapter's recipe. Returns the base merged into."""
    base = base or base_of(adapter)
    check_output(out, [adapter, base], overwrite)
    model, tokenizer = open_adapted(adapter, base=base, merge=True, force=force)
    recipe = Path(adapter) / RECIPE_FILE
    save_checkpoint(
        out,
        model.config,
        export_state_dict(model),
        recipe_toml=recipe.read_text() if recipe.is_file() else None,
        tokenizer=tokenizer,
    )
    return base
