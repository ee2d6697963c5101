"""The fused decode step (llmctl/kernels/decode_step.cpp through llmctl.infer.fused_step): the model's own
arithmetic in one kernel call, so its logits and the cache it writes equal the eager step's for every family
option, one token per row or several, and it is what chat and serve run by default on a CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import decisive_model

from llmctl.infer.background_compile import compile_in_background
from llmctl.infer.cpu_decode import use_decode_kernels
from llmctl.infer.decode import (
    _rows_step,
    decode_rows,
    limit_context,
    load_for_inference,
    prefill_first_row,
)
from llmctl.infer.fused_step import fused_step_for, use_fused_step
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.kernels import MAX_ROWS

# every option of the one model class a family sets (llmctl.model.config): GQA, biases, q/k norms, a head
# width apart from d_model / n_head, tied embeddings, RoPE scaling
SHAPES = {
    "llama": {},
    "qwen2": dict(family="qwen2", attention_bias=True, n_kv_head=1),
    "qwen3": dict(family="qwen3", qk_norm=True, attention_bias=True, output_bias=True, d_head=24),
    "tied, llama3 RoPE": dict(
        tie_embeddings=True, rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=16
    ),
    "yarn RoPE, no GQA": dict(
        n_kv_head=4, rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=16
    ),
    # the usual head width of 64, whose attention runs in vector registers (others in scalar loops)
    "head width 64": dict(d_model=128, n_head=2, n_kv_head=1),
}


def jittered(seed: int = 0, **shape) -> torch.nn.Module:
    """A decisive model whose norms and biases are not their initial ones (ones, zeros), so that a kernel that
    skipped one would not agree by accident."""
    model = decisive_model(seed, **shape)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    use_decode_kernels(model)
    return model


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_the_fused_step_computes_the_models_logits_and_cache(shape):
    model = jittered(**shape)
    assert use_fused_step(model)
    fused_cache, eager_cache = (model.new_kv_cache(4, slots=True) for _ in range(2))
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for lengths in ([0, 0, 0], [5, 9, 2]):  # three rows, then at lengths of their own
            fused_cache.lengths[:3] = eager_cache.lengths[:3] = torch.tensor(lengths)
            for width in (4, 1, 1, 3):  # several tokens per row (a prefill chunk, a verification), then one
                ids = torch.randint(0, model.config.vocab_size, (3, width), generator=generator)
                fused = decode_rows(model, ids, fused_cache)
                eager = decode_rows(model, ids, eager_cache, step=_rows_step)  # the model's own forward
                torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
        assert torch.equal(fused_cache.lengths, eager_cache.lengths)
        fused_layers, eager_layers = (
            fused_cache.keys + fused_cache.values,
            eager_cache.keys + eager_cache.values,
        )
        for fused_layer, eager_layer in zip(fused_layers, eager_layers, strict=True):
            torch.testing.assert_close(fused_layer, eager_layer, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [SHAPES["llama"], SHAPES["qwen3"]], ids=["llama", "qwen3"])
def test_greedy_generation_on_the_fused_step_equals_the_eager_one(shape):
    eager = jittered(**shape)
    expected = [list(generate_ids(eager, prompt, _greedy(24))) for prompt in ([1, 2, 3], list(range(30, 50)))]
    assert use_fused_step(eager)  # a 3-token prompt is prefilled by the fused step, a 20-token one is not
    assert [
        list(generate_ids(eager, prompt, _greedy(24))) for prompt in ([1, 2, 3], list(range(30, 50)))
    ] == (expected)


def _greedy(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, temperature=0.0)


def test_a_short_prefill_is_one_fused_call_and_a_long_one_a_forward(monkeypatch):
    from llmctl.infer import decode

    forwards: list[int] = []
    forward = decode.prefill
    monkeypatch.setattr(
        decode,
        "prefill",
        lambda model, ids, cache: forwards.append(ids.shape[1]) or forward(model, ids, cache),
    )
    model = jittered()
    use_fused_step(model)
    with torch.inference_mode():
        for length in (MAX_ROWS, MAX_ROWS + 1):
            prompt = list(range(1, length + 1))
            cache = model.new_kv_cache(1, max_len=40, slots=True)
            logits = prefill_first_row(model, prompt, cache)
            expected = model(torch.tensor([prompt]))[:, -1]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
            assert int(cache.lengths[0]) == length
    assert forwards == [MAX_ROWS + 1]  # the 16-token prompt never reached the model's forward
    assert fused_step_for(model, 1, MAX_ROWS) is not None and fused_step_for(model, 1, MAX_ROWS + 1) is None
    assert (
        fused_step_for(model, MAX_ROWS, 1) is not None and fused_step_for(model, 2, MAX_ROWS // 2 + 1) is None
    )


def test_layers_the_kernel_does_not_compute_keep_the_other_steps():
    bf16 = jittered().to(torch.bfloat16)
    assert not use_fused_step(bf16)
    adapted = jittered()
    adapted.model.layers[0].self_attn.q_proj = _Wrapped(adapted.model.layers[0].self_attn.q_proj)
    assert not use_fused_step(adapted)
    assert fused_step_for(adapted, 1, 1) is None


def test_a_layer_or_weight_replaced_after_loading_leaves_the_fused_step():
    """What the kernel reads is fixed when the step is made: anything set on the model later (an adapter's
    wrapper, a quantized layer, another head, a new parameter) sends its steps back to the model's forward."""
    model = jittered()
    use_fused_step(model)
    model.model.layers[1].mlp.down_proj = _Wrapped(model.model.layers[1].mlp.down_proj)
    assert fused_step_for(model, 1, 1) is None
    other = jittered()
    use_fused_step(other)
    other.model.norm.weight = torch.nn.Parameter(torch.zeros_like(other.model.norm.weight))
    assert fused_step_for(other, 1, 1) is None
    reloaded = jittered()
    use_fused_step(reloaded)
    with torch.no_grad():  # weights loaded in place are read by the next step
        reloaded.lm_head.weight.mul_(-1)
    cache = reloaded.new_kv_cache(1, slots=True)
    with torch.inference_mode():
        fused = decode_rows(reloaded, torch.tensor([[3]]), cache)
        cache.lengths.zero_()
        eager = decode_rows(reloaded, torch.tensor([[3]]), cache, step=_rows_step)
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


class _Wrapped(torch.nn.Module):
    """A stand-in for an adapter or quantized wrapper: a linear the kernel cannot read as plain weights."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.inner = linear
        self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_chat_and_serve_load_the_fused_step_and_compile_nothing_it_serves(tiny_checkpoint):
    loaded, _ = load_for_inference(tiny_checkpoint)
    limit_context(loaded, 64)  # new RoPE tables, read by every step: the fused step stays
    assert fused_step_for(loaded, 1, 1) is not None
    # chat's one row, serve's default 16; more rows compile (tests/test_background_compile.py)
    assert compile_in_background(loaded, MAX_ROWS) is None


def test_an_explicit_compile_skips_what_the_fused_step_serves():
    from llmctl.infer import decode
    from llmctl.infer.engine import Engine

    model = jittered()
    use_fused_step(model)
    Engine(model, max_batch=4, compile=True)  # `serve --compile`: every step of 4 rows is the fused one
    assert model not in decode._compiled_steps
