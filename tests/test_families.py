"""The open model families users adapt, each built locally with transformers' own config class: llmctl's logits
and greedy tokens equal transformers', RoPE scaling holds beyond the original context, and a checkpoint
written by llmctl opens in transformers as the same family."""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model.hf_format import export_state_dict, load_model, read_config, write_model_files

transformers = pytest.importorskip("transformers")

VOCAB, CONTEXT, ORIGINAL = 173, 128, 32  # tests run to position ~100: past the original context of 32
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=CONTEXT,
    rms_norm_eps=1e-6,
)


def llama3_rope() -> dict:
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    }


FAMILIES = {
    "llama-2": lambda: transformers.LlamaConfig(**SHAPE),
    "llama-3.2 (llama3 rope, tied)": lambda: transformers.LlamaConfig(
        **SHAPE, rope_parameters=llama3_rope(), tie_word_embeddings=True
    ),
    "llama linear rope": lambda: transformers.LlamaConfig(
        **SHAPE, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    ),
    "llama attention bias": lambda: transformers.LlamaConfig(**SHAPE, attention_bias=True),
    "smollm2 (tied, 3 of 9 kv heads)": lambda: transformers.LlamaConfig(
        **{**SHAPE, "hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3},
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(**SHAPE, sliding_window=None),
    "mistral (window past the context)": lambda: transformers.MistralConfig(**SHAPE, sliding_window=4096),
    "qwen2.5 (q/k/v bias)": lambda: transformers.Qwen2Config(**SHAPE, tie_word_embeddings=True),
    "qwen2.5 yarn": lambda: transformers.Qwen2Config(
        **SHAPE,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
    ),
    "qwen3 (q/k norm, head_dim 32)": lambda: transformers.Qwen3Config(**SHAPE, head_dim=32),
}


def hf_model(family: str, vocab_size: int = VOCAB):
    """A random model of the family whose biases and norms are random too (their inits are 0 and 1), with a
    scaled head so that greedy picks never rest on a near-tie."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config.vocab_size = vocab_size
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
        model.lm_head.weight.mul_(4)
    return model


@pytest.fixture(params=list(FAMILIES))
def saved(request, tmp_path):
    model = hf_model(request.param)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path


def test_logits_equal_transformers_beyond_the_original_context(saved):
    theirs, root = saved
    ours = load_model(root / "hf")
    ids = torch.randint(0, VOCAB, (2, 100))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4


def test_the_same_greedy_tokens_as_transformers(saved):
    theirs, root = saved
    ours = load_model(root / "hf")
    prompt = torch.randint(0, VOCAB, (1, 40)).tolist()[0]
    with torch.no_grad():
        expected = theirs.generate(
            torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()
    assert list(generate_ids(ours, prompt, SamplingParams(max_new_tokens=24, temperature=0.0))) == expected


def test_saved_by_llmctl_it_opens_in_transformers_as_its_family_unchanged(saved):
    theirs, root = saved
    ours = load_model(root / "hf")
    (root / "ours").mkdir()
    write_model_files(root / "ours", ours.config, export_state_dict(ours))
    written = json.loads((root / "ours" / "config.json").read_text())
    assert written["model_type"] == theirs.config.model_type
    again = transformers.AutoModelForCausalLM.from_pretrained(root / "ours").eval()
    assert type(again) is type(theirs)
    ids = torch.randint(0, VOCAB, (1, 90))
    with torch.no_grad():
        assert (again(ids).logits - theirs(ids).logits).abs().max().item() < 1e-4
    assert read_config(root / "ours") == ours.config


@pytest.mark.parametrize(
    "config, key",
    [
        (lambda: transformers.MistralConfig(**SHAPE, sliding_window=16), "sliding_window"),
        (
            lambda: transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=16),
            "sliding_window",
        ),
        (
            lambda: transformers.LlamaConfig(
                **SHAPE, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
            ),
            "rope_type",
        ),
        (lambda: transformers.LlamaConfig(**SHAPE, mlp_bias=True), "mlp_bias"),
        (lambda: transformers.MixtralConfig(**SHAPE), "model_type 'mixtral' is not supported"),
    ],
)
def test_what_llmctl_cannot_run_is_refused_naming_the_key(tmp_path, config, key):
    from llmctl.checkpoint import open_model
    from llmctl.errors import UserError

    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config()).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=key):
        open_model(tmp_path)


def test_chat_and_serve_reserve_at_most_8192_positions_unless_asked(tmp_path):
    """A Llama 3.2 trained for 131,072 positions would otherwise reserve a KV cache that long per row."""
    from llmctl.errors import UserError
    from llmctl.infer.decode import limit_context

    torch.manual_seed(0)
    long_context = {**SHAPE, "max_position_embeddings": 131072}
    theirs = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**long_context, rope_parameters=llama3_rope())
    )
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 60))
    with torch.no_grad():
        before = ours(ids)
        assert limit_context(ours, None) == 8192 and ours.new_kv_cache(1).keys[0].shape[2] == 8192
        assert torch.equal(ours(ids), before)  # the positions kept have the same angles
        assert limit_context(ours, 1024) == 1024 and ours.config.max_seq_len == 1024
    with pytest.raises(UserError, match="longer than the 131072 positions"):
        limit_context(load_model(tmp_path), 200000)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_qwen2_keeps_its_biases_through_a_save(tmp_path, method):
    from llmctl.checkpoint import open_model
    from llmctl.quantization.quantize import QuantizationSettings, quantize_model

    hf_model("qwen2.5 (q/k/v bias)").save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    ids = torch.randint(0, VOCAB, (1, 50))
    with torch.no_grad():
        full = model(ids)
        settings = QuantizationSettings(method=method, group_size=32)
        quantized = quantize_model(model, settings)
        logits = quantized(ids)
    assert (logits - full).abs().max() < (0.1 if method == "int8" else 0.6) * full.abs().max()
    state = export_state_dict(quantized)
    assert (
        "model.layers.0.self_attn.q_proj.bias" in state
        and "model.layers.0.self_attn.o_proj.bias" not in state
    )
    (tmp_path / "q").mkdir()
    write_model_files(tmp_path / "q", quantized.config, state, quantization_config=settings.to_config())
    with torch.no_grad():
        assert torch.equal(open_model(tmp_path / "q")(ids), logits)
