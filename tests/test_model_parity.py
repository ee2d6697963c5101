"""Logit parity with Hugging Face transformers: the checkpoint format is theirs, so the maths must be too."""

from __future__ import annotations

import pytest
import torch

from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict, load_model, write_model_files

transformers = pytest.importorskip("transformers")

SHAPES = {
    "mha-untied": dict(n_head=4, n_kv_head=4, tie_embeddings=False),
    "gqa-untied": dict(n_head=4, n_kv_head=2, tie_embeddings=False),
    "gqa-tied": dict(n_head=8, n_kv_head=2, tie_embeddings=True),
    "mha-tied": dict(n_head=4, n_kv_head=None, tie_embeddings=True),
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=211, d_model=64, n_layer=3, d_ff=96, max_seq_len=64, rope_theta=5000.0)
    return ModelConfig(**{**base, **overrides})


@pytest.mark.parametrize("shape", SHAPES)
def test_llmctl_checkpoint_opens_in_transformers_with_same_logits(tmp_path, shape):
    torch.manual_seed(0)
    model = Transformer(tiny_config(**SHAPES[shape])).eval()
    write_model_files(tmp_path, model.config, export_state_dict(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 211, (2, 37))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_checkpoint_loads_into_llmctl_with_same_logits(tmp_path, shape):
    torch.manual_seed(1)
    spec = SHAPES[shape]
    hf_config = transformers.LlamaConfig(
        vocab_size=199,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=spec["n_head"],
        num_key_value_heads=spec["n_kv_head"] or spec["n_head"],
        max_position_embeddings=64,
        tie_word_embeddings=spec["tie_embeddings"],
        rms_norm_eps=1e-6,
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, 199, (3, 29))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", ["mha-untied", "gqa-tied"])
def test_kv_cache_decoding_matches_full_forward(shape):
    torch.manual_seed(2)
    model = Transformer(tiny_config(**SHAPES[shape])).eval()
    ids = torch.randint(0, 211, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(batch_size=2)
        pieces = [model(ids[:, :11], kv_cache=cache)]  # prefill
        pieces += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(11, 24)]  # decode one by one
        pieces.append(model(ids[:, 24:], kv_cache=cache))  # a multi-token chunk after the cache
    incremental = torch.cat(pieces, dim=1)
    assert cache.length == 30
    assert (incremental - full).abs().max().item() < 1e-4


def test_left_padded_batch_matches_unpadded_sequences():
    torch.manual_seed(3)
    model = Transformer(tiny_config(**SHAPES["gqa-untied"])).eval()
    long, short = torch.randint(4, 211, (1, 12)), torch.randint(4, 211, (1, 7))
    pad = 5
    batch = torch.cat([long, torch.cat([torch.full((1, pad), 3), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_kv_cache(batch_size=2)
        logits = model(batch, position_ids=positions, attention_mask=mask, kv_cache=cache)
        assert (logits[0] - model(long)[0]).abs().max() < 1e-4
        assert (logits[1, pad:] - model(short)[0]).abs().max() < 1e-4
        next_ids = torch.tensor([[7], [9]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step = model(next_ids, position_ids=positions[:, -1:] + 1, attention_mask=mask, kv_cache=cache)
        alone = model(torch.cat([short, next_ids[1:]], dim=1))[0, -1]
    assert (step[1, 0] - alone).abs().max() < 1e-4
