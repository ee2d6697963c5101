"""Model hyper-parameters: the one description of a shape, shared by recipes, checkpoints and planners."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated

from annotated_types import Gt

Positive = Gt(0)  # read by pydantic when the recipe's [model] section is derived from this class


def default_ffn_size(d_model: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: 2/3 of 4*d_model (same parameters as a 4x GELU MLP), rounded up."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: Annotated[int, Positive] = 32000
    d_model: Annotated[int, Positive] = 512
    n_layer: Annotated[int, Positive] = 8
    n_head: Annotated[int, Positive] = 8
    n_kv_head: Annotated[int, Positive] | None = None  # grouped-query attention; default n_head
    d_ff: Annotated[int, Positive] | None = None  # SwiGLU width; default 8/3 d_model rounded up to 256
    max_seq_len: Annotated[int, Positive] = 2048
    rope_theta: Annotated[float, Positive] = 10000.0
    norm_eps: Annotated[float, Positive] = 1e-5
    tie_embeddings: bool = False
    init_std: Annotated[float, Positive] = 0.02
    # token ids come from the tokenizer, not the recipe
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 3

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.d_model, self.n_layer, self.n_head, self.max_seq_len) <= 0:
            raise ValueError("vocab_size, d_model, n_layer, n_head and max_seq_len must be positive")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_size(self) -> int:
        return self.d_ff or default_ffn_size(self.d_model)

    def num_parameters(self) -> int:
        """Exact parameter count, computed from the shape without building the model."""
        d, kv = self.d_model, self.kv_heads * self.head_dim
        attention = d * d * 2 + d * kv * 2
        mlp = 3 * d * self.ffn_size
        per_layer = attention + mlp + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * per_layer + embeddings + d

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward + backward, as PaLM's MFU counts them: 6N + 12*L*d*seq.

        N counts the weights used in matmuls (the input embedding is a lookup, not a matmul).
        """
        seq = seq_len or self.max_seq_len
        matmul_params = self.num_parameters() - (0 if self.tie_embeddings else self.vocab_size * self.d_model)
        return 6 * matmul_params + 12 * self.n_layer * self.d_model * seq

    def to_dict(self) -> dict:
        return asdict(self)
