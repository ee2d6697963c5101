"""The decoder-only Llama-style transformer: embeddings, N pre-norm blocks, final norm, LM head."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmctl.model.config import ModelConfig
from llmctl.model.kv_cache import DecodeRows, KVCache, SlotKVCache, layer_buffers
from llmctl.model.layers import Block, RMSNorm, rotary_tables
from llmctl.model.loss import linear_cross_entropy, logits_cross_entropy


class Decoder(nn.Module):
    """HF's `LlamaModel` (the `model.` prefix of every weight name)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) booleans: causal, and within one document."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)


def document_ids_of(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """Which document each token belongs to, in windows where documents end with `separator_id` (eos); the
    separator belongs to the document it ends."""
    ends = input_ids == separator_id
    return torch.cumsum(ends, dim=1) - ends.long()


@contextmanager
def meta_without_init() -> Iterator[None]:
    """Build modules on the meta device without their random initialisation, for weights about to be loaded.

    Random init of meta tensors runs through torch's Python reference kernels, whose first use imports the
    compiler stack: ~2-3 s added to every command that opens a checkpoint. Linear and embedding layers
    (subclasses included) skip their `reset_parameters`, and `Transformer.init_weights` skips meta tensors.
    """
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


class Transformer(nn.Module):
    """`forward(input_ids) -> logits`, with optional KV cache, position ids and padding mask for decoding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        if self.device.type != "meta":  # a meta model gets its tables when it is materialised
            self.init_rope()
        self.init_weights()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """A tied LM head is the embedding matrix itself; call again after anything that replaces parameters.
        A head and embedding held as buffers (quantized, say) share every buffer they both have."""
        if not self.config.tie_embeddings:
            return
        self.lm_head.weight = self.model.embed_tokens.weight
        for name, buffer in self.model.embed_tokens.named_buffers(recurse=False):
            if name in self.lm_head._buffers:
                self.lm_head._buffers[name] = buffer

    def init_rope(self) -> None:
        """(Re)build the rotary tables, e.g. after materialising a model that was built on the meta device."""
        cos, sin = rotary_tables(self.config, self.config.max_seq_len, self.device)
        self.rope_cos, self.rope_sin = cos, sin

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere but norms (1) and biases (0); residual output projections scaled by
        1/sqrt(2 * n_layer)."""
        if self.device.type == "meta":  # nothing to fill: the weights are set later
            return
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.normal_(0.0, residual_std)
            else:
                param.normal_(0.0, std)

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, slots: bool = False
    ) -> KVCache | SlotKVCache:
        """A static cache; `slots=True` gives per-row positions for continuous batching. Its tensors are plain
        ones even when made under inference mode: a compiled decode step's graphs hold to the kind of tensor
        they were traced on, and a cache made in `generate_ids` must run the graphs a warm-up traced."""
        max_len = max_len or self.config.max_seq_len
        weight = self.model.norm.weight  # a float parameter even when the embedding is quantized
        with torch.inference_mode(False):
            keys, values = layer_buffers(self.config, batch_size, max_len, weight.dtype, weight.device)
            return (SlotKVCache if slots else KVCache)(keys, values, max_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | DecodeRows | None = None,
        targets: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (batch, seq, vocab); with `targets`, (loss, cross-entropy) from the fused LM-head loss.

        attention_mask: (batch, cached + seq) with 1 for real tokens and 0 for padding, when padding exists.
        position_ids: (batch, seq); defaults to consecutive positions after what the cache holds.
        document_ids: (batch, seq), training only: a token attends only to earlier tokens of its own document
        (windows cut from a stream of documents otherwise let a document see its predecessor).
        targets: (batch, seq) next-token ids, -100 where no loss is wanted. The loss is computed inside
        forward so that FSDP's hooks gather the LM head for it.
        """
        seq = input_ids.shape[1]
        if isinstance(kv_cache, DecodeRows):  # one decode step of a continuous batch
            position_ids, mask = kv_cache.positions_and_mask(seq)
        else:
            start = kv_cache.length if kv_cache is not None else 0
            if start + seq > self.config.max_seq_len:
                raise ValueError(
                    f"{start + seq} tokens exceed the model's context of {self.config.max_seq_len} tokens"
                )
            if position_ids is None:
                position_ids = torch.arange(start, start + seq, device=input_ids.device).unsqueeze(0)
            mask = self._attention_mask(start, seq, attention_mask, input_ids.device)
            if document_ids is not None:
                mask = document_mask(document_ids)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]

        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, kv_cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        x = self.model.norm(x)  # (B, T, d_model)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab)
        if type(self.lm_head) is nn.Linear:  # the fused, chunked loss never materialises the logits
            return linear_cross_entropy(
                x, self.lm_head.weight, targets, label_smoothing=label_smoothing, z_loss=z_loss
            )
        # an adapted or quantized head computes its own logits
        return logits_cross_entropy(self.lm_head(x), targets, label_smoothing=label_smoothing, z_loss=z_loss)

    @staticmethod
    def _attention_mask(
        start: int, seq: int, padding: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """None means plain causal attention over the current tokens (SDPA's fused `is_causal` path)."""
        if padding is None and start == 0:
            return None
        if padding is None and seq == 1:
            return None  # one new token attends to everything cached
        query = torch.arange(start, start + seq, device=device)[:, None]
        key = torch.arange(start + seq, device=device)[None, :]
        mask = (key <= query)[None, None]
        if padding is not None:
            mask = mask & padding[:, None, None, : start + seq].bool()
            # A padding query with nothing to attend to would produce NaN that leaks through 0 * NaN;
            # letting every query see itself keeps padded rows finite (their outputs are never used).
            mask = mask | (key == query)[None, None]
        return mask
