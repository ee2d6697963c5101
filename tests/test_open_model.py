"""The model calls its modules: a projection swapped for another module (an adapter, a quantized linear) is
used by the forward pass, every generator and the serving engine; the CPU decode fast path is an explicit
swap that leaves such modules alone."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

from llmctl.infer.beam import BeamParams, beam_search
from llmctl.infer.cpu_decode import DecodeLinear, use_decode_kernels
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_batch, generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.kernels import MAX_ROWS
from llmctl.model import ModelConfig, Transformer

CONFIG = ModelConfig(vocab_size=97, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=96, max_seq_len=64)


class Recorder(nn.Module):
    """Wraps a module and counts its calls, as a LoRA or quantized wrapper would be called."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def recorded():
    torch.manual_seed(0)
    model = Transformer(CONFIG).eval()
    recorder = Recorder(model.model.layers[0].self_attn.q_proj)
    model.model.layers[0].self_attn.q_proj = recorder
    return model, recorder


GREEDY = SamplingParams(max_new_tokens=5, temperature=0.0)  # no stop ids: exactly 5 tokens


def test_forward_and_loss_go_through_a_swapped_projection(recorded):
    model, recorder = recorded
    ids = torch.randint(0, 97, (2, 9))
    model(ids)
    model(ids, targets=ids)
    assert recorder.calls == 2
    recorder.inner.weight.data.zero_()  # the swapped module's weights, not a copy, shape the output
    assert not torch.equal(model(ids), Transformer(CONFIG).eval()(ids))


def test_every_generator_goes_through_a_swapped_projection(recorded):
    model, recorder = recorded
    list(generate_ids(model, [1, 2, 3], GREEDY))
    assert recorder.calls == 5  # one prefill and four decode steps
    generate_batch(model, [[1, 2, 3], [4, 5]], GREEDY)
    assert recorder.calls == 10
    beam_search(model, [1, 2, 3], BeamParams(num_beams=2, max_new_tokens=4))
    assert recorder.calls > 10


def test_the_serving_engine_goes_through_a_swapped_projection(recorded):
    model, recorder = recorded
    engine = Engine(model, max_batch=2).start()
    finished = threading.Event()
    try:
        engine.submit([1, 2, 3], GREEDY, lambda token, finish: finish and finished.set())
        assert finished.wait(30)
    finally:
        engine.stop()
    assert recorder.calls == 5


def test_decode_kernel_swap_keeps_wrappers_and_matches_torch(recorded):
    model, recorder = recorded
    ids = torch.randint(0, 97, (1, 7))
    with torch.inference_mode():
        reference = model(ids)
    assert use_decode_kernels(model) == 2 * 7 + 1
    swapped = [m for m in model.modules() if isinstance(m, DecodeLinear)]
    assert len(swapped) == 2 * 7 + 1  # every projection (the wrapped one's inner linear too) and the head
    assert type(model.model.layers[0].self_attn.k_proj) is DecodeLinear
    assert model.model.layers[0].self_attn.q_proj is recorder  # the wrapper keeps its own forward
    assert type(recorder.inner) is DecodeLinear
    with torch.inference_mode():
        fast = model(ids)
    assert recorder.calls == 2
    assert torch.allclose(fast, reference, atol=1e-5)


# rows go in chunks of 3 (AVX2) or 4 (AVX-512): full chunks, and a last chunk of each size
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 10, 11, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("shape", [(8, 64), (21, 40), (200, 99)])  # out not a multiple of 8; in not of 8
def test_the_fp32_decode_kernel_equals_torch_at_every_row_count(rows, shape):
    torch.manual_seed(rows)
    linear = nn.Linear(shape[1], shape[0], bias=False)
    fast = DecodeLinear(shape[1], shape[0], bias=False, device="meta")
    fast.weight = linear.weight
    x = torch.randn(rows, shape[1])
    with torch.inference_mode():
        assert torch.allclose(fast(x), linear(x), atol=1e-5, rtol=1e-5)
        assert torch.allclose(fast(x[None]), linear(x[None]), atol=1e-5, rtol=1e-5)
    x.requires_grad_(True)  # with gradients torch's product runs and the input gets its gradient
    fast(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, linear.weight.sum(0).expand_as(x), atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 4, 5, MAX_ROWS])
def test_projections_of_one_input_run_as_one_kernel_call_equal_to_torch(rows):
    torch.manual_seed(rows)
    linears = [
        nn.Linear(40, out, bias=False) for out in (21, 8, 200)
    ]  # uneven widths, none a block's multiple
    fast = []
    for linear in linears:
        fast.append(DecodeLinear(40, linear.out_features, bias=False, device="meta"))
        fast[-1].weight = linear.weight
    x = torch.randn(1, rows, 40)
    with torch.inference_mode():
        together = DecodeLinear.forward_together(x, tuple(fast))
        for product, linear in zip(together, linears, strict=True):
            assert product.shape == (1, rows, linear.out_features)
            assert torch.allclose(product, linear(x), atol=1e-5, rtol=1e-5)


def test_a_decode_step_calls_the_kernel_once_for_q_k_v_and_once_for_gate_up(recorded):
    model, recorder = recorded
    use_decode_kernels(model)
    ids = torch.randint(0, 97, (1, 1))

    def kernel_calls() -> dict[str, int]:
        with torch.inference_mode(), torch.profiler.profile() as profile:
            model(ids)
        names = [event.name for event in profile.events() if event.name.startswith("llmctl_decode::")]
        return {name: names.count(name) for name in set(names)}

    # o_proj and down_proj of both layers and the head run alone; layer 0's q_proj is wrapped (a LoRA, say),
    # so its q, k and v run one by one while layer 1 groups them
    assert kernel_calls() == {"llmctl_decode::fp32_linear_group": 3, "llmctl_decode::fp32_linear": 4 + 1 + 3}
    model.model.layers[0].self_attn.q_proj = recorder.inner
    assert kernel_calls() == {"llmctl_decode::fp32_linear_group": 4, "llmctl_decode::fp32_linear": 4 + 1}


def test_decode_kernel_swap_keeps_a_tied_head_tied():
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layer=1, n_head=2, tie_embeddings=True))
    use_decode_kernels(model)
    assert type(model.lm_head) is DecodeLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_an_adapted_head_trains_with_the_same_loss_as_the_fused_one():
    torch.manual_seed(0)
    plain = Transformer(CONFIG)
    wrapped = Transformer(CONFIG)
    wrapped.load_state_dict(plain.state_dict())
    wrapped.lm_head = Recorder(wrapped.lm_head)
    ids = torch.randint(0, 97, (2, 11))
    targets = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
    settings = dict(label_smoothing=0.1, z_loss=1e-3)
    loss_fused, ce_fused = plain(ids, targets=targets, **settings)
    loss_wrapped, ce_wrapped = wrapped(ids, targets=targets, **settings)
    assert wrapped.lm_head.calls == 1
    assert torch.allclose(loss_fused, loss_wrapped, atol=1e-5) and torch.allclose(
        ce_fused, ce_wrapped, atol=1e-5
    )
    loss_fused.backward()
    loss_wrapped.backward()
    assert torch.allclose(plain.lm_head.weight.grad, wrapped.lm_head.inner.weight.grad, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        ModelConfig(vocab_size=500, d_model=96, n_layer=3, n_head=6, tie_embeddings=True),
        ModelConfig(vocab_size=500, d_model=96, n_layer=3, n_head=6, n_kv_head=3, d_ff=200),
    ],
)
def test_parameter_count_is_the_models_own(config):
    model = Transformer(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_the_data_layer_loads_no_torch():
    code = (
        "import sys, llmctl.data.filters, llmctl.data.corpus, llmctl.data.sources, llmctl.data.jsonl;"
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
