"""Building blocks of the decoder: RMSNorm, rotary embeddings, attention and the SwiGLU MLP.

Module and parameter names follow Hugging Face's Llama so a state dict moves between the two unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.model.config import ModelConfig
from llmctl.model.kv_cache import DecodeRows, KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even under autocast: the mean of squares overflows fp16 and loses bf16 bits.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_frequencies(config: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Each rotary pair's angle per position, with the config's RoPE scaling applied, and the factor that
    scales cos and sin (YaRN's attention temperature; 1 otherwise)."""
    dim, theta = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (theta**exponents)
    factor = config.rope_factor
    if config.rope_scaling == "linear":
        return inv_freq / factor, 1.0
    if config.rope_scaling == "llama3":  # long wavelengths slowed by the factor, short kept, a blend between
        context = config.rope_original_max_seq_len
        wavelength = 2 * math.pi / inv_freq
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        smooth = ((context / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    if config.rope_scaling == "yarn":  # a linear ramp over the pairs between interpolation and extrapolation
        context = config.rope_original_max_seq_len

        def pair_of(rotations: float) -> float:  # the pair that turns `rotations` times over the context
            return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(pair_of(config.rope_beta_fast)), 0)
        high = min(math.ceil(pair_of(config.rope_beta_slow)), dim - 1)
        ramp = (torch.arange(dim // 2, device=device).float() - low) / max(high - low, 1e-3)
        extrapolated = 1 - ramp.clamp(0, 1)
        blended = inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated
        temperature = config.rope_attention_factor
        if temperature is None:
            temperature = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return blended, temperature
    return inv_freq, 1.0


def rotary_tables(
    config: ModelConfig, max_len: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, (max_len, head_dim), in the half-split layout that HF Llama checkpoints use."""
    inv_freq, scale = rotary_frequencies(config, device)
    positions = torch.arange(max_len, dtype=torch.int64, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by per-position angles; cos/sin are (batch|1, seq, head_dim)."""
    half = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query per row (a decode step) as two small products and a softmax: on a CPU, SDPA's
    flash kernel spends ~90 us a call setting up for this, and under torch.compile these fuse."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, 1, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def project_together(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """x through several projections that read it (q, k and v; gate and up). Where all are of one kind that
    can run them as one call (`forward_together`: llmctl's CPU decode linears, one parallel region instead of
    one per projection), they do; otherwise, as in training, each runs on its own."""
    kind = type(linears[0])
    if hasattr(kind, "forward_together") and all(type(linear) is kind for linear in linears):
        return kind.forward_together(x, linears)
    return [linear(x) for linear in linears]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.d_model, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.d_model, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.output_bias)
        if config.qk_norm:  # HF Qwen3's names
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | DecodeRows | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape  # x: (B, T, d_model)
        q, k, v = project_together(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(batch, seq, self.n_head, self.head_dim)
        k = k.view(batch, seq, self.n_kv_head, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, n_head, T, hd)
        k = k.transpose(1, 2)  # (B, n_kv, T, hd)
        v = v.view(batch, seq, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_index, k, v)  # (B, n_kv, cached + T, hd)
        if (
            self.n_kv_head != self.n_head
        ):  # grouped-query attention: each kv head serves n_head / n_kv queries
            groups = self.n_head // self.n_kv_head
            k = k.repeat_interleave(groups, dim=1)  # (B, n_head, S, hd)
            v = v.repeat_interleave(groups, dim=1)
        # mask: None (plain causal) or (B|1, 1, T, S) booleans, True where a query may see a key
        if seq == 1 and q.device.type == "cpu":
            out = one_query_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1)
        out = out.transpose(1, 2).reshape(batch, seq, self.n_head * self.head_dim)  # (B, T, n_head * hd)
        return self.o_proj(out)  # (B, T, d_model)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_size, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_size, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project_together(x, (self.gate_proj, self.up_proj))
        hidden = F.silu(gate) * up  # (B, T, d_ff)
        return self.down_proj(hidden)  # (B, T, d_model)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: KVCache | DecodeRows | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))
