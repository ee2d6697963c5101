"""Choosing what `llmctl up` trains from scratch: a vocabulary for the corpus's size, and the model shape and
token count that this machine's measured training speed allows in the time left, by the compute-optimal rule
of about 20 training tokens per parameter (Hoffmann et al., 2022), bounded by the data available."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

TOKENS_PER_PARAMETER = 20
MAX_EPOCHS = 4  # repeating data up to ~4 times costs little against fresh data (Muennighoff et al., 2023)
MICRO_BATCH = 8


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_layer: int
    n_head: int
    n_kv_head: int
    max_seq_len: int

    def model_settings(self, vocab_size: int) -> dict:
        """The recipe's [model] section for this shape."""
        return {
            "vocab_size": vocab_size,
            "d_model": self.d_model,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "max_seq_len": self.max_seq_len,
            "tie_embeddings": True,
        }


# Smallest first; widths and depths as the small GPT/Llama ladders grow them, heads of 32-64 channels.
LADDER = (
    Shape(128, 4, 4, 2, 256),
    Shape(192, 4, 6, 2, 256),
    Shape(256, 6, 8, 2, 256),
    Shape(384, 8, 6, 2, 512),
    Shape(512, 10, 8, 4, 512),
    Shape(768, 12, 12, 4, 1024),
    Shape(1024, 16, 16, 4, 1024),
    Shape(1536, 20, 16, 4, 2048),
    Shape(2048, 24, 16, 16, 2048),
)


def vocabulary_size(corpus_bytes: int) -> int:
    """Fewer pieces for less text: each piece needs enough occurrences to learn, and on a small model the
    embedding table is most of the parameters. 1,024 below 1 MB, doubling per 4x more text, up to 32,768."""
    if corpus_bytes <= 1 << 20:
        return 1024
    steps = math.floor(math.log(corpus_bytes / (1 << 20), 4)) + 1
    return min(32768, 1024 << steps)


@dataclass(frozen=True)
class ShapeChoice:
    shape: Shape
    parameters: int
    tokens: int  # what the training time allows at the measured speed
    tokens_per_second: float
    reason: str


def measured_flops_per_second(vocab_size: int, seconds: float = 1.5) -> float:
    """Training FLOP/s this machine reaches on a small model of the run's vocabulary: forward, backward and
    an AdamW step on random tokens, after one warm-up step, timed for about `seconds`."""
    import torch

    from llmctl.model import ModelConfig, Transformer

    config = ModelConfig(
        vocab_size=vocab_size, d_model=256, n_layer=4, n_head=8, n_kv_head=2, max_seq_len=256
    )
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, vocab_size, (MICRO_BATCH, config.max_seq_len + 1), generator=generator)

    def step() -> None:
        loss, _ = model(inputs[:, :-1], targets=inputs[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    steps, started = 0, time.perf_counter()
    while steps < 2 or time.perf_counter() - started < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - started
    return config.flops_per_token() * MICRO_BATCH * config.max_seq_len * steps / elapsed


def choose_shape(
    vocab_size: int, train_seconds: float, data_tokens: int, flops_per_second: float
) -> ShapeChoice:
    """The largest shape that the time trains on at least 20 tokens per parameter and that the data (at
    most 4 passes) can feed as many; the smallest shape when none qualifies."""
    from llmctl.model import ModelConfig

    chosen = None
    reason = "the largest shape llmctl up trains"
    for shape in LADDER:
        config = ModelConfig(**shape.model_settings(vocab_size))
        parameters = config.num_parameters()
        speed = flops_per_second / config.flops_per_token(shape.max_seq_len)
        tokens = min(int(speed * train_seconds), MAX_EPOCHS * data_tokens)
        needed = TOKENS_PER_PARAMETER * parameters
        if chosen is not None and tokens < needed:
            limit = "time" if speed * train_seconds < MAX_EPOCHS * data_tokens else "data (4 passes)"
            reason = (
                f"d_model {shape.d_model} ({parameters / 1e6:.1f}M) would get {tokens / parameters:.1f} tokens "
                f"per parameter from the {limit}, under {TOKENS_PER_PARAMETER}"
            )
            break
        chosen = ShapeChoice(shape, parameters, tokens, speed, "")
    assert chosen is not None
    return ShapeChoice(chosen.shape, chosen.parameters, chosen.tokens, chosen.tokens_per_second, reason)
