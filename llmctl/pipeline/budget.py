"""How `llmctl up` spends its time budget: each stage's estimated seconds and disk, from the documents' size,
the model's size and this machine's measured training speed; training gets what the other stages leave."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmctl.errors import UserError

# Rates measured on the 2-core CI machine (benchmarks/RESULTS.md: data throughput), rounded down.
CORPUS_BYTES_PER_SECOND = 2.5e6
TOKENIZER_BYTES_PER_SECOND = 2e6
ENCODE_BYTES_PER_SECOND = 5e6
IMPORT_BYTES_PER_SECOND = 5e6  # of GGUF file: SmolLM2-135M's 100 MB Q4_1 took 20 s
BYTES_PER_TOKEN = 4
STAGE_OVERHEAD_SECONDS = 3.0  # imports, opening the model, writing
MEASURE_DECODE_SECONDS = 15.0  # quantize: both models' decode speed
REGISTER_SECONDS = 15.0  # MLflow's store, the card, the report's plots
MIN_TRAIN_SECONDS = 20.0


@dataclass(frozen=True)
class PlannedStage:
    name: str
    what: str
    seconds: float
    disk_bytes: int
    training: bool = False  # its seconds are the budget's remainder


def data_stage_seconds(document_bytes: int, tokenizer: bool) -> dict[str, float]:
    seconds = {
        "corpus": STAGE_OVERHEAD_SECONDS + document_bytes / CORPUS_BYTES_PER_SECOND,
        "tokenizer": STAGE_OVERHEAD_SECONDS + document_bytes / TOKENIZER_BYTES_PER_SECOND,
        "tokens": STAGE_OVERHEAD_SECONDS + document_bytes / ENCODE_BYTES_PER_SECOND,
    }
    if not tokenizer:
        del seconds["tokenizer"]
    return seconds


def import_seconds(gguf_bytes: int) -> float:
    """Dequantizing a GGUF file through transformers and writing it in fp32."""
    return STAGE_OVERHEAD_SECONDS + gguf_bytes / IMPORT_BYTES_PER_SECOND


def evaluation_seconds(heldout_bytes: int, parameters: int, flops_per_second: float) -> float:
    """Forward passes (2 FLOPs per parameter per token) over the held-out split, each token scored in two
    windows (the stride is half the window), at the training speed's rate."""
    tokens = heldout_bytes / BYTES_PER_TOKEN
    return 2 * STAGE_OVERHEAD_SECONDS + 2 * 2 * parameters * tokens / flops_per_second


def quantize_seconds(heldout_bytes: int, parameters: int, flops_per_second: float) -> float:
    """Write int8, then measure both models' perplexity and decode speed."""
    return 2 * evaluation_seconds(heldout_bytes, parameters, flops_per_second) + MEASURE_DECODE_SECONDS


def training_split(seconds: float, chat_share: float, chat_minimum: float) -> tuple[float, float]:
    """(pretraining or adaptation, chat finetuning) seconds: the chat share when it is worth running."""
    chat = seconds * chat_share
    if chat < chat_minimum:
        return seconds, 0.0
    return seconds - chat, chat


def parse_duration(text: str) -> float:
    """Seconds in '30m', '1h', '1h30m', '90s' or a plain number of minutes."""
    cleaned = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned) * 60
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", cleaned)
    if not cleaned or parts is None:
        raise UserError(f"--budget {text!r}: give a duration such as 30m, 1h, 1h30m or 90s")
    hours, minutes, seconds = (float(part) if part else 0.0 for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds
