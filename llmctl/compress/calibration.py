"""Calibration windows for calibrated quantization (GPTQ): token windows cut from a user's text."""

from __future__ import annotations

import random

import torch

from llmctl.data.tokenizer_base import Tokenizer
from llmctl.errors import UserError


def calibration_windows(
    texts: list[str], tokenizer: Tokenizer, count: int, length: int, seed: int = 0
) -> list[torch.Tensor]:
    """Up to `count` windows of `length` tokens, (1, length) each, drawn at random positions of the
    documents joined with eos; fewer when the text is short (one clear error when it has none at all)."""
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_id)
        if len(stream) >= count * length * 4:  # plenty to draw from; no need to tokenize a whole corpus
            break
    available = len(stream) // length
    if available == 0:
        raise UserError(
            f"the calibration text has {len(stream)} tokens, fewer than one {length}-token window; "
            "give a larger corpus or file to --calibrate"
        )
    starts = random.Random(seed).sample(range(available), min(count, available))
    return [torch.tensor(stream[start * length : (start + 1) * length])[None] for start in sorted(starts)]
