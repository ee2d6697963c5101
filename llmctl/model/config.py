"""Model hyper-parameters: the one description of a shape, shared by recipes, checkpoints and planners."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from annotated_types import Gt

Positive = Gt(0)  # read by pydantic when the recipe's [model] section is derived from this class
# The architectures a checkpoint is written as (config.json's model_type): one model with options, where each
# family fixes some of them (Qwen2: q/k/v biases; Qwen3: q/k norms).
Family = Literal["llama", "mistral", "qwen2", "qwen3"]
RopeScaling = Literal["linear", "llama3", "yarn"]


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
    family: Family = "llama"
    d_head: Annotated[int, Positive] | None = None  # per-head width; default d_model / n_head
    attention_bias: bool = False  # biases on the q, k and v projections
    output_bias: bool = False  # a bias on the attention output projection
    qk_norm: bool = False  # RMSNorm over each head's queries and keys, before RoPE
    # RoPE scaling for contexts beyond the pretraining one: linear (positions / factor), llama3 (per-frequency,
    # Llama 3.1+), yarn (Qwen2.5's long context); the rest apply to the type that names them
    rope_scaling: RopeScaling | None = None
    rope_factor: Annotated[float, Positive] = 1.0
    rope_original_max_seq_len: Annotated[int, Positive] | None = None  # llama3, yarn
    rope_low_freq_factor: Annotated[float, Positive] = 1.0  # llama3
    rope_high_freq_factor: Annotated[float, Positive] = 4.0  # llama3
    rope_beta_fast: Annotated[float, Positive] = 32.0  # yarn
    rope_beta_slow: Annotated[float, Positive] = 1.0  # yarn
    rope_attention_factor: Annotated[float, Positive] | None = None  # yarn; default 0.1 ln(factor) + 1
    # token ids come from the tokenizer, not the recipe
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 3

    def __post_init__(self) -> None:
        if min(self.vocab_size, self.d_model, self.n_layer, self.n_head, self.max_seq_len) <= 0:
            raise ValueError("vocab_size, d_model, n_layer, n_head and max_seq_len must be positive")
        if self.d_head is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        family_problem = self._family_problem()
        if family_problem:
            raise ValueError(f"family {self.family}: {family_problem}")
        if self.rope_scaling in ("llama3", "yarn") and self.rope_original_max_seq_len is None:
            raise ValueError(f"rope_scaling {self.rope_scaling} needs rope_original_max_seq_len")

    def _family_problem(self) -> str | None:
        """What this family's config.json cannot express, or None."""
        llama_like = self.attention_bias == self.output_bias and not self.qk_norm
        rules = {
            "llama": (llama_like, "attention_bias and output_bias go together, and there is no qk_norm"),
            "mistral": (
                not (self.attention_bias or self.output_bias or self.qk_norm),
                "no attention biases and no qk_norm",
            ),
            "qwen2": (
                self.attention_bias and not self.output_bias and not self.qk_norm and self.d_head is None,
                "attention_bias on, output_bias and qk_norm off, and no d_head",
            ),
            "qwen3": (
                self.qk_norm and self.attention_bias == self.output_bias,
                "qk_norm on; attention_bias and output_bias go together",
            ),
        }
        holds, rule = rules[self.family]
        return None if holds else f"needs {rule}"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_head

    @property
    def ffn_size(self) -> int:
        return self.d_ff or default_ffn_size(self.d_model)

    def num_parameters(self) -> int:
        """Exact parameter count, computed from the shape without building the model."""
        d, q, kv = self.d_model, self.n_head * self.head_dim, self.kv_heads * self.head_dim
        attention = 2 * d * q + 2 * d * kv
        attention += (
            (q + 2 * kv) * self.attention_bias + d * self.output_bias + 2 * self.head_dim * self.qk_norm
        )
        mlp = 3 * d * self.ffn_size
        per_layer = attention + mlp + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layer * per_layer + embeddings + d

    def matmul_parameters(self) -> int:
        """The weights used in matmuls (the input embedding is a lookup, not a matmul)."""
        return self.num_parameters() - (0 if self.tie_embeddings else self.vocab_size * self.d_model)

    def flops_per_token(self, seq_len: int | None = None, frozen: bool = False) -> int:
        """Training FLOPs per token, forward + backward, as PaLM's MFU counts them: 6N + 12*L*d*seq; with
        `frozen` weights (LoRA's base), 4N: their backward computes input gradients but no weight gradients.
        """
        seq = seq_len or self.max_seq_len
        per_weight = 4 if frozen else 6
        return per_weight * self.matmul_parameters() + 12 * self.n_layer * self.n_head * self.head_dim * seq

    def to_dict(self) -> dict:
        return asdict(self)
