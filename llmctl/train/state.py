"""Saving and restoring a training run: full (unsharded) model and optimizer state under HF parameter names,
so a checkpoint written by DDP, FSDP2, a compiled model or one process opens anywhere."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from llmctl.checkpoint import TRAINER_STATE_FILE
from llmctl.errors import UserError
from llmctl.model.hf_format import read_state_dict, with_tied_head, without_tied_head
from llmctl.train.optim import Optimizers

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gathered on rank 0 (collective under FSDP: every rank must call it); a tied head is left out."""
    state = without_tied_head(get_model_state_dict(model, options=FULL), model.config)
    return {name: tensor.contiguous() for name, tensor in state.items()}


def full_optimizer_state(model: nn.Module, optimizer: Optimizers) -> dict:
    return get_optimizer_state_dict(model, optimizer.parts, options=FULL)


def rng_state() -> dict:
    """Every generator's state in plain types and tensors, so the file loads with `weights_only=True`."""
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model_weights(model: nn.Module, checkpoint: Path, is_main: bool) -> None:
    """Load HF-named weights into a (possibly sharded) model; rank 0 reads, the others receive."""
    state = with_tied_head(read_state_dict(checkpoint), model.config) if is_main else {}
    distributed = torch.distributed.is_initialized()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed, strict=True)
    set_model_state_dict(model, state, options=options)


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer state: step, optimizer moments, RNG, scaler and counters."""
    path = checkpoint / TRAINER_STATE_FILE
    try:  # weights_only: tensors and plain containers only, so a crafted file cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot resume from {checkpoint}: {path.name} is not a trainer state llmctl wrote ({reason})"
        ) from None
    return state


def restore_trainer_state(model: nn.Module, optimizer: Optimizers, state: dict, is_main: bool) -> None:
    """Put the optimizer moments and every RNG back where `state` left them. Each group keeps the settings
    this run's recipe gave it (rate scales, weight decay, betas): loading would bring back the saved run's,
    and a resume may change those (`check_resume_matches`)."""
    distributed = torch.distributed.is_initialized()
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    settings = [
        {key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups
    ]
    set_optimizer_state_dict(
        model, optimizer.parts, state["optimizer"] if is_main or not distributed else {}, options=options
    )
    for group, recipe_settings in zip(optimizer.param_groups, settings, strict=True):
        group.update(recipe_settings)
    restore_rng_state(state["rng"])
