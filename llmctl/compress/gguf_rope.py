"""Llama 3's RoPE scaling in llama.cpp's form and back: a GGUF stores it as `rope_freqs`, each rotary pair's
base frequency over its scaled one, where a Hugging Face config names a factor, an original context and two
frequency factors. The divisors fix only the two wavelengths between which pairs blend (original / high and
original / low), so reading them back takes Llama 3's original context of 8192, which gives Llama 3.1 and
3.2's own settings exactly; any other choice gives the same model."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from llmctl.model import ModelConfig
from llmctl.model.layers import rotary_frequencies

LLAMA3_ORIGINAL_CONTEXT = 8192


def rope_frequency_divisors(config: ModelConfig) -> np.ndarray:
    """Llama 3 scaling as llama.cpp stores it: each rotary pair's base frequency over its scaled one."""
    scaled, _ = rotary_frequencies(config)
    plain, _ = rotary_frequencies(replace(config, rope_scaling=None))
    return (plain / scaled).numpy().astype(np.float32)


def llama3_scaling(divisors: np.ndarray, config: ModelConfig) -> dict[str, object]:
    """The ModelConfig fields of the Llama 3 scaling whose divisors are `divisors` for `config`'s rotary
    pairs (its rope_theta and head_dim), checked by recomputing them; a ValueError where none fits."""
    divisors = np.asarray(divisors, dtype=np.float64)
    plain, _ = rotary_frequencies(replace(config, rope_scaling=None))
    if divisors.shape != (plain.shape[0],):
        raise ValueError(f"rope_freqs has {divisors.size} values for {plain.shape[0]} rotary pairs")
    factor = float(divisors.max())
    wavelength = (2 * math.pi / plain.double()).numpy()
    kept, slowed = divisors <= 1 + 1e-4, divisors >= factor * (1 - 1e-4)
    if factor <= 1 + 1e-4 or not slowed.any():
        raise ValueError("its rope_freqs are no Llama 3 scaling (no pair is slowed)")
    # a pair between the kept and the slowed ones blends them, 1 / d = (1 - s) / factor + s, where s falls
    # linearly in 1 / wavelength from 1 at the wavelength `short` (original / high) to 0 at `long` (original / low)
    between = ~kept & ~slowed
    blend = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
    inverse = 1 / wavelength[between]
    if between.sum() >= 2:
        slope, intercept = np.polyfit(inverse, blend, 1)  # s = slope / wavelength + intercept
        short, long = slope / (1 - intercept), -slope / intercept
    else:  # too few blended pairs to fix both ends: put an end at the longest kept pair
        short = wavelength[kept].max() if kept.any() else wavelength.min() / 2
        long = wavelength[slowed].min()
        if between.any():  # and the other where the one blended pair says
            long = 1 / ((inverse[0] - blend[0] / short) / (1 - blend[0]))
    original = LLAMA3_ORIGINAL_CONTEXT
    low, high = original / long, original / short
    fields = {
        "rope_scaling": "llama3",
        "rope_factor": round(factor, 6),
        "rope_original_max_seq_len": original,
        "rope_low_freq_factor": round(float(low), 6),
        "rope_high_freq_factor": round(float(high), 6),
    }
    fitted = rope_frequency_divisors(replace(config, **fields))
    if not torch.allclose(torch.from_numpy(fitted).double(), torch.from_numpy(divisors), rtol=1e-4):
        raise ValueError("its rope_freqs are no Llama 3 scaling (no factors reproduce them)")
    return fields
