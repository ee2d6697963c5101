"""A whole decode step in one call of llmctl's kernel (llmctl/kernels/decode_step.cpp): what `llmctl chat` and
`llmctl serve` run on a CPU, for a model whose layers are all plain fp32 ones, for every step of up to
MAX_ROWS new tokens in all (one per row to decode; a short prompt's prefill, or a draft's proposals to
verify, several).

Even compiled, a step of a small model runs ~25 projections one after another, each paying a fork and join of
the thread pool and the graph wrapper's dispatch and allocations between them: a third of a 16.8M model's
step on 2 cores. The kernel keeps the threads in one parallel region for the whole step, as llama.cpp does,
and needs no compiling, so the first reply already runs at full speed. Every other step (more tokens,
quantized or adapted layers, bf16 weights, other devices) takes the compiled or the eager step
(llmctl.infer.decode)."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from llmctl.infer.cpu_decode import DecodeLinear
from llmctl.kernels import MAX_ROWS, decode_ops
from llmctl.model import Transformer
from llmctl.model.kv_cache import DecodeRows
from llmctl.model.layers import RMSNorm


class FusedStep:
    """The kernel's arguments that do not change between steps: the model's parameters themselves, in the
    kernel's order (so that weights loaded or changed in place are what the next step reads)."""

    def __init__(self, model: Transformer) -> None:
        config = model.config
        self.weights = layer_weights(model)
        self.embedding = model.model.embed_tokens.weight
        self.norm = model.model.norm.weight
        self.head = model.lm_head.weight
        self.shape = (config.n_head, config.kv_heads, config.norm_eps)
        self.options = (config.attention_bias, config.output_bias, config.qk_norm)

    def __call__(
        self, model: Transformer, ids: torch.Tensor, rows: DecodeRows, last_only: bool = False
    ) -> torch.Tensor:
        """New tokens (B, width) after each row's cached ones; their logits (B, width, vocab), or with
        `last_only` each row's last token's (B, 1, vocab), with the cache advanced. The RoPE tables are read
        from the model at every step: `limit_context` rebuilds them after loading."""
        batch, width = ids.shape
        logits = torch.ops.llmctl_decode.fp32_decode_step(
            ids.contiguous(),
            rows.positions,
            self.embedding,
            self.weights,
            self.norm,
            self.head,
            rows.keys,
            rows.values,
            model.rope_cos,
            model.rope_sin,
            *self.shape,
            *self.options,
            last_only,
        )
        rows.advance(width)
        return logits.view(batch, 1 if last_only else width, -1)


def _projections(block: nn.Module) -> list[nn.Module]:
    """A block's seven projections in decode_step.cpp's order: q, k, v, o, then gate, up, down."""
    attention, mlp = block.self_attn, block.mlp
    return [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj,
            mlp.down_proj]  # fmt: skip


def layer_weights(model: Transformer) -> list[torch.Tensor]:
    """Each layer's tensors in decode_step.cpp's order: its input norm, the attention's projections, its
    post-attention norm, the MLP's, then the q/k/v biases, the output bias and the q/k norms where the config
    has them."""
    config = model.config
    weights = []
    for block in model.model.layers:
        attention = block.self_attn
        projections = [linear.weight for linear in _projections(block)]
        weights += [block.input_layernorm.weight, *projections[:4]]
        weights += [block.post_attention_layernorm.weight, *projections[4:]]
        if config.attention_bias:
            weights += [attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]
        if config.output_bias:
            weights.append(attention.o_proj.bias)
        if config.qk_norm:
            weights += [attention.q_norm.weight, attention.k_norm.weight]
    return weights


def _plain(model: Transformer) -> bool:
    """Whether every layer is one the kernel computes exactly: fp32 CPU weights in plain linears, norms and
    embedding (no quantized, adapted or pruned wrappers)."""
    linears = [model.lm_head]
    norms = [model.model.norm]
    for block in model.model.layers:
        linears += _projections(block)
        norms += [block.input_layernorm, block.post_attention_layernorm]
        norms += [block.self_attn.q_norm, block.self_attn.k_norm] if model.config.qk_norm else []
    if any(type(linear) not in (nn.Linear, DecodeLinear) for linear in linears):
        return False
    if type(model.model.embed_tokens) is not nn.Embedding or any(type(norm) is not RMSNorm for norm in norms):
        return False
    tensors = [*(linear.weight for linear in linears), model.model.embed_tokens.weight, model.rope_cos]
    return all(
        tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous()
        for tensor in tensors
    )


_fused_steps: weakref.WeakKeyDictionary[Transformer, FusedStep] = weakref.WeakKeyDictionary()
# every module of a model with a fused step -> that model: a module or parameter set on one of them later (an
# adapter, a quantized layer, another head) is one the kernel would not read, so the model's fused step goes
_parts: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Transformer]] = weakref.WeakKeyDictionary()
_watching: list[object] = []  # the registration hooks, installed with the first fused step


def use_fused_step(model: Transformer) -> bool:
    """Run this model's decode steps of up to MAX_ROWS new tokens in the fused kernel from now on, where
    its layers allow it and the kernels are built here. Returns whether it applies. Replacing one of its
    modules or parameters afterwards returns the model to the other steps."""
    if model.device.type != "cpu" or not _plain(model) or decode_ops() is None:
        return False
    if not _watching:
        _watching.append(register_module_module_registration_hook(_forget_changed))
        _watching.append(register_module_parameter_registration_hook(_forget_changed))
    _fused_steps[model] = FusedStep(model)
    for module in model.modules():
        _parts[module] = weakref.ref(model)
    return True


def _forget_changed(module: nn.Module, name: str, value: object) -> None:
    """A registration hook: a part of a fused model changed, so its fused step would compute the old model."""
    owner = _parts.get(module)
    model = owner() if owner is not None else None
    if model is not None:
        _fused_steps.pop(model, None)


def fused_step_for(model: Transformer, batch: int, width: int) -> FusedStep | None:
    """The model's fused step where it serves a step of `batch` rows of `width` new tokens, else None."""
    if not 1 <= batch * width <= MAX_ROWS:
        return None
    return _fused_steps.get(model)


def fused_serves_all(model: Transformer, rows: int) -> bool:
    """Whether every one-token step of up to `rows` rows runs in the fused kernel: nothing to compile."""
    return rows <= MAX_ROWS and model in _fused_steps
