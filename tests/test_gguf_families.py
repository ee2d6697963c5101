"""GGUF export of every open family llmctl reads, as llama.cpp expects it: the architecture (`llama` for Llama
and Mistral, `qwen2`, `qwen3`), biases, q/k norms, Llama 3 RoPE scaling as `rope_freqs`, and a tokenizer.json's
byte-level BPE vocabulary with its pre-tokenizer's name. Read back three ways: llmctl's reader, transformers'
GGUF loader (through `llmctl import`), and llama.cpp itself where llama-cpp-python is installed."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_level_tokenizer, llama_cpp_greedy, sample_texts
from test_families import FAMILIES, hf_model

from llmctl.checkpoint import open_checkpoint
from llmctl.compress.gguf_export import read_gguf_model, write_gguf
from llmctl.compress.gguf_import import import_gguf
from llmctl.compress.gguf_rope import llama3_scaling, rope_frequency_divisors
from llmctl.compress.gguf_vocabulary import pre_tokenizer_spec, read_vocabulary
from llmctl.errors import UserError
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model import ModelConfig
from llmctl.model.hf_format import export_state_dict

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

EXPORTED = [family for family in FAMILIES if "yarn" not in family]
ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# transformers' GGUF loader drops the llama architecture's attention biases and linear RoPE scaling, and reads
# no attention.key_length for qwen3 (so a head_dim apart from d_model / n_head); llama.cpp reads them all.
# Llama 3's rope_freqs, which it drops too, `llmctl import` reads back itself.
READ_BY_TRANSFORMERS = [
    "llama-2",
    "llama-3.2 (llama3 rope, tied)",
    "smollm2 (tied, 3 of 9 kv heads)",
    "mistral",
    "qwen2.5 (q/k/v bias)",
]
TEXT = "Set port = 8080 in 2024; naïve café ✓ 日本 — isn't it?\n\n  def f(x): return x**2"


@pytest.fixture(scope="module")
def tokenizer_directory(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    byte_level_tokenizer(sample_texts(), vocab_size=400).save(str(directory / "tokenizer.json"))
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(names))
    return directory


def with_pre_tokenizer(source: Path, target: Path, pre: str) -> Path:
    """The tokenizer files of `source` whose tokenizer.json splits text as llama.cpp's `pre` does."""
    target.mkdir(parents=True, exist_ok=True)
    spec = json.loads((source / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = pre_tokenizer_spec(pre)
    (target / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(source / "tokenizer_config.json", target)
    return target


@pytest.fixture(params=EXPORTED)
def exported(request, tokenizer_directory, tmp_path):
    directory = tmp_path / "checkpoint"
    vocab = json.loads((tokenizer_directory / "tokenizer.json").read_text())["model"]["vocab"]
    hf_model(request.param, vocab_size=len(vocab)).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_directory / name, directory)
    model, tokenizer = open_checkpoint(directory)
    path = tmp_path / "model.gguf"
    write_gguf(path, model.config, export_state_dict(model), tokenizer.path, "f32", "t", "{{ messages }}")
    return model, tokenizer, path


def test_an_export_holds_the_familys_architecture_and_reads_back_to_the_same_logits(exported):
    model, _, path = exported
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == ARCHITECTURE[model.config.family]
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    names = {tensor.name for tensor in reader.tensors}
    assert ("blk.0.attn_q.bias" in names) == model.config.attention_bias
    assert ("blk.0.attn_q_norm.weight" in names) == model.config.qk_norm
    assert ("rope_freqs.weight" in names) == (model.config.rope_scaling == "llama3")
    ids = torch.randint(0, model.config.vocab_size, (2, 100))  # past the original context of the scaled ones
    with torch.no_grad():
        assert (read_gguf_model(path)(ids) - model(ids)).abs().max().item() < 1e-4


def test_transformers_reads_the_export_as_the_same_model_and_tokenizer(exported, request, tmp_path):
    if request.node.callspec.params["exported"] not in READ_BY_TRANSFORMERS:
        pytest.skip("transformers' GGUF loader does not read this option")
    model, tokenizer, path = exported
    imported, imported_tokenizer = open_checkpoint(import_gguf(path, tmp_path / "imported"))
    assert imported.config.family == ("llama" if model.config.family == "mistral" else model.config.family)
    ids = torch.randint(0, model.config.vocab_size, (2, 60))
    with torch.no_grad():
        assert (imported(ids) - model(ids)).abs().max().item() < 1e-4
    assert imported_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def test_llama_cpp_generates_what_llmctl_generates(exported):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is an optional extra (llmctl[llama])"
    )
    model, tokenizer, path = exported
    prompt = tokenizer.encode(TEXT)[:40]
    ours = list(generate_ids(model, prompt, SamplingParams(max_new_tokens=16, temperature=0.0)))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tokenizer.encode(TEXT)
        theirs = llama_cpp_greedy(llm, prompt, 16)
    finally:
        llm.close()
    assert theirs == ours


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_each_pre_tokenizer_is_named_and_import_restores_it(pre, tokenizer_directory, tmp_path):
    from llmctl.data.tokenizer import open_tokenizer

    directory = with_pre_tokenizer(tokenizer_directory, tmp_path / pre, pre)
    tokenizer = open_tokenizer(directory)
    vocabulary = read_vocabulary(gguf, directory / "tokenizer.json", tokenizer.vocab_size + 3)
    assert vocabulary.pre == pre and len(vocabulary.tokens) == tokenizer.vocab_size + 3
    assert vocabulary.types[-1] == gguf.TokenType.UNUSED and vocabulary.types[1] == gguf.TokenType.CONTROL
    hf = hf_model("llama-2", vocab_size=tokenizer.vocab_size)
    hf.save_pretrained(directory)
    model, _ = open_checkpoint(directory)
    path = tmp_path / "model.gguf"
    write_gguf(path, model.config, export_state_dict(model), directory / "tokenizer.json", "q8_0", "t")
    imported = open_tokenizer(import_gguf(path, tmp_path / "imported"))
    assert imported.encode(TEXT) == tokenizer.encode(TEXT)
    assert json.loads((tmp_path / "imported" / "tokenizer.json").read_text())["pre_tokenizer"]["type"] == (
        "ByteLevel" if pre == "gpt-2" else "Sequence"
    )


def test_what_llama_cpp_cannot_hold_is_refused_in_one_line(tokenizer_directory, tmp_path):
    spec = json.loads((tokenizer_directory / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "always",
        "split": True,
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="none that llama.cpp names"):
        read_vocabulary(gguf, tmp_path / "tokenizer.json", 1000)
    hf_model("qwen2.5 yarn", vocab_size=len(spec["model"]["vocab"])).save_pretrained(tmp_path / "yarn")
    shutil.copy(tokenizer_directory / "tokenizer.json", tmp_path / "yarn")
    shutil.copy(tokenizer_directory / "tokenizer_config.json", tmp_path / "yarn")
    model, tokenizer = open_checkpoint(tmp_path / "yarn")
    with pytest.raises(UserError, match="YaRN"):
        write_gguf(tmp_path / "y.gguf", model.config, export_state_dict(model), tokenizer.path, "f32", "t")
    assert not (tmp_path / "y.gguf").exists()


def test_llama3_rope_freqs_read_back_as_the_releases_settings():
    """Llama 3.1 (factor 8) and 3.2 (factor 32) as llama.cpp stores them give back their own config values;
    divisors that no Llama 3 scaling makes are refused."""
    base = ModelConfig(vocab_size=64, d_model=2048, n_layer=1, n_head=32, n_kv_head=8, max_seq_len=131072,
                       rope_theta=500000.0)  # fmt: skip
    for factor in (8.0, 32.0):
        release = dict(rope_scaling="llama3", rope_factor=factor, rope_original_max_seq_len=8192,
                       rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)  # fmt: skip
        assert llama3_scaling(rope_frequency_divisors(replace(base, **release)), base) == release
    with pytest.raises(ValueError, match="no Llama 3 scaling"):
        llama3_scaling(np.linspace(1.0, 8.0, 32, dtype=np.float32) ** 2, base)
