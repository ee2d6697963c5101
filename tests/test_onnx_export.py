"""`llmctl export --format onnx`: a directory onnxruntime runs, whose logits are llmctl's, whose KV-cache
inputs and outputs decode the same greedy tokens, and whose refusals are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prune_export import heldout_file, run_compress

from llmctl.checkpoint import open_checkpoint
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams

pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra")
pytest.importorskip("onnxruntime", reason="ONNX export needs the onnx extra")


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported once through the CLI, and what the command printed."""
    from conftest import run_llmctl

    tmp_path = tmp_path_factory.mktemp("onnx")
    out = tmp_path / "model"
    result = run_compress(run_llmctl, "export", tiny_checkpoint, out, tmp_path, "--format", "onnx")
    return out, result


def test_the_export_is_a_directory_with_the_graph_config_tokenizer_and_a_table(exported):
    out, result = exported
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.model"} <= {
        path.name for path in out.iterdir()
    }
    row = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("onnx"))
    assert "0.00%" in row  # the export's held-out perplexity is the source's
    assert "decode speed: onnxruntime" in result.stdout


def test_onnxruntime_gives_llmctls_logits_with_and_without_its_cache(exported, tiny_checkpoint):
    from llmctl.compress.onnx_export import OnnxCausalLM, empty_past

    out, _ = exported
    model, _ = open_checkpoint(tiny_checkpoint)
    onnx_model = OnnxCausalLM(out)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (3, 20), generator=generator)
    with torch.no_grad():
        reference = model(ids)
    torch.testing.assert_close(onnx_model(ids), reference, atol=1e-3, rtol=0)

    # 12 tokens with an empty cache, then 8 more through the cache it returned: the same logits
    first = ids[:, :12].numpy()
    positions = np.broadcast_to(np.arange(20), (3, 20))
    logits, past = onnx_model.step(
        first, np.ones((3, 12), np.int64), positions[:, :12], empty_past(model.config, 3)
    )
    assert past[0].shape == (3, model.config.kv_heads, 12, model.config.head_dim)
    more, past = onnx_model.step(ids[:, 12:].numpy(), np.ones((3, 20), np.int64), positions[:, 12:], past)
    assert past[-1].shape[2] == 20
    torch.testing.assert_close(
        torch.from_numpy(np.concatenate((logits, more), 1)), reference, atol=1e-3, rtol=0
    )

    # a left-padded row: its padding masked out, its positions starting at its first real token
    padded = torch.cat((torch.zeros(1, 5, dtype=torch.long), ids[:1, :15]), dim=1)
    mask = np.concatenate((np.zeros((1, 5), np.int64), np.ones((1, 15), np.int64)), axis=1)
    shifted = np.concatenate((np.zeros((1, 5), np.int64), np.arange(15)[None]), axis=1)
    logits, _ = onnx_model.step(padded.numpy(), mask, shifted, empty_past(model.config, 1))
    torch.testing.assert_close(torch.from_numpy(logits[:, 5:]), reference[:1, :15], atol=1e-3, rtol=0)


def test_greedy_decoding_through_the_cache_inputs_matches_llmctl(exported, tiny_checkpoint):
    from llmctl.compress.onnx_export import OnnxCausalLM

    out, _ = exported
    model, tokenizer = open_checkpoint(tiny_checkpoint)
    prompt = [tokenizer.bos_id, *tokenizer.encode("The daemon listens on a socket")]
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    ours = list(generate_ids(model, prompt, params))
    assert len(ours) == 24
    assert OnnxCausalLM(out).greedy(prompt, 24) == ours


def test_onnx_export_refuses_bad_input_with_one_line(llmctl_in_process, tiny_checkpoint, tmp_path):
    held = heldout_file(tmp_path)
    out = tmp_path / "onnx"
    for options, message in (
        (["--type", "q8_0"], "--type q8_0 is a GGUF type; an ONNX export is written f32"),
        (["--heldout", str(tmp_path / "missing.txt")], "missing.txt"),
    ):
        arguments = ["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out), *options]
        if "--heldout" not in options:
            arguments += ["--heldout", str(held)]
        result = llmctl_in_process(*arguments)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
