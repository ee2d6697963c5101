"""Shared fixtures: a way to run the real `llmctl` CLI in a subprocess, and paths to the bundled data."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"
SHARED_TECHDOCS = REPO.parent / "shared" / "data" / "techdocs"
# chat and serve compile their decode step in the background by default: on two cores that would slow every
# other test that starts them, so they run eager here; test_background_compile.py tests the default itself
os.environ["LLMCTL_COMPILE"] = "0"


# The slowest files first (minutes, measured in CI): `make test`'s two workers then end together, instead of
# one running a long file alone at the end while the other waits.
SLOWEST_FIRST = (
    "test_up.py",
    "test_compiled_decode.py",
    "test_models.py",
    "test_quantize.py",
    "test_open_models.py",
    "test_run_safety.py",
    "test_finetune.py",
    "test_distributed.py",
    "test_executors.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


def run_llmctl(
    *args: str, cwd: Path = REPO, pythonpath: list[Path] = (), check: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `python -m llmctl ARGS` and capture its output: the CLI exactly as a user meets it."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    env["COLUMNS"] = "200"  # wide tables whatever the terminal (pytest-xdist's workers have none)
    result = subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"llmctl {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `error: ...` line a user error ends in (exit 2, no traceback)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


def tiny_recipe_dict(pipeline: dict[str, Path], run_dir: Path, **train) -> dict:
    """A recipe for a 2-layer model on the sample tokens: seconds per run on CPU."""
    return {
        "name": "test",
        "model": {
            "vocab_size": 1024,
            "d_model": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_kv_head": 2,
            "d_ff": 128,
            "max_seq_len": 64,
        },
        "data": {"tokens": str(pipeline["tokens"]), "tokenizer": str(pipeline["tokenizer"])},
        "train": {
            "steps": 8,
            "micro_batch_size": 4,
            "global_batch_size": 8,
            "log_every": 1,
            "eval_every": 0,
            "eval_batches": 2,
            **train,
        },
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
        "checkpoint": {"dir": str(run_dir), "every": 4, "keep_last": 5},
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    server: object  # uvicorn.Server: set `should_exit` to stop it as SIGTERM would
    thread: threading.Thread


@contextmanager
def running_server(app, timeout: float = 30) -> Iterator[RunningServer]:
    """Serve an ASGI app with uvicorn on a free localhost port; start and stop both bounded by `timeout`."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout)
        assert not thread.is_alive(), "the server did not stop"


def decisive_model(seed: int = 0, **shape):
    """A small random model whose logits are decisive (a scaled head), so that a greedy choice never rests on
    a near-tie that rounding could flip: what token-for-token comparisons of decode paths need."""
    import torch

    from llmctl.model import ModelConfig, Transformer

    torch.manual_seed(seed)
    config = dict(vocab_size=128, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=48) | shape
    model = Transformer(ModelConfig(**config)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


class Collector:
    """An engine request's callback: its tokens, its finish reason, and an event set when it ends."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, token: int | None, finish: str | None) -> None:
        if token is not None:
            self.tokens.append(token)
        if finish is not None:
            self.finish = finish
            self.done.set()


def wait_until(condition, timeout: float = 30, message: str = "condition not reached") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


@pytest.fixture
def llmctl():
    return run_llmctl


@pytest.fixture
def llmctl_in_process(monkeypatch, capsys):
    """`llmctl ARGS` through the CLI's own entry point, in this process: for commands whose process is not what
    a test is about, so that each call does not pay a fresh interpreter's imports (2 s for torch, 4 s with
    MLflow). Signals, terminals, servers, torchrun and crashes keep `llmctl`'s real process."""
    from llmctl.cli import main

    def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["llmctl", *args])
        monkeypatch.setenv("COLUMNS", "200")
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main()
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess(args, exited.value.code or 0, captured.out, captured.err)
        if check and result.returncode != 0:
            raise AssertionError(f"llmctl {' '.join(args)} failed ({result.returncode}):\n{captured.err}")
        return result

    return run


@pytest.fixture(scope="session")
def sample_pipeline(tmp_path_factory) -> dict[str, Path]:
    """The bundled sample corpus built, tokenized (vocab 1024) and encoded once for the whole session."""
    from llmctl.data.corpus import CorpusOptions, build_corpus
    from llmctl.data.token_files import encode_corpus
    from llmctl.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("sample")
    corpus, tokenizer, tokens = root / "corpus", root / "tokenizer", root / "tokens"
    build_corpus(
        [str(SAMPLE / "train.jsonl"), str(SAMPLE / "val.jsonl")], corpus, CorpusOptions(val_fraction=0.1)
    )
    train_tokenizer(corpus, tokenizer, vocab_size=1024)
    encode_corpus(corpus, tokenizer / "tokenizer.model", tokens)
    return {"root": root, "corpus": corpus, "tokenizer": tokenizer / "tokenizer.model", "tokens": tokens}


@pytest.fixture(scope="session")
def tiny_checkpoint(sample_pipeline, tmp_path_factory) -> Path:
    """A small random model with the sample tokenizer, saved as a servable checkpoint."""
    import torch

    from llmctl.checkpoint import save_checkpoint
    from llmctl.data.tokenizer import open_tokenizer
    from llmctl.model import ModelConfig, Transformer
    from llmctl.model.hf_format import export_state_dict

    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=1024, d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=128
    )
    model = Transformer(config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return save_checkpoint(
        path, config, export_state_dict(model), tokenizer=open_tokenizer(sample_pipeline["tokenizer"])
    )


def sample_texts(count: int = 200) -> list[str]:
    import json

    return [json.loads(line)["text"] for line in (SAMPLE / "train.jsonl").open()][:count]


def byte_level_tokenizer(texts: list[str], special_tokens: tuple[str, ...] = (), vocab_size: int = 600):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, with <unk> <s> </s> <pad> first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>", *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def hf_llama_directory(
    path: Path,
    texts: list[str],
    chat_markers: bool = True,
    special_tokens: tuple[str, ...] = (),
    tokenizer_config: dict | None = None,
) -> Path:
    """What a user downloads: config.json + safetensors from transformers, and a byte-level BPE tokenizer.json
    from the tokenizers library (with llmctl's chat markers as added tokens, unless `chat_markers` is off, and
    `special_tokens`), its `tokenizer_config.json` updated with `tokenizer_config` (a chat template, say)."""
    import json

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmctl.data.tokenizer_base import CHAT_MARKERS

    tokenizer = byte_level_tokenizer(texts, (*(CHAT_MARKERS if chat_markers else ()), *special_tokens))
    path.mkdir(parents=True)
    tokenizer.save(str(path / "tokenizer.json"))
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(names | (tokenizer_config or {})))
    torch.manual_seed(0)
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), num_key_value_heads=2, **shape, **ids)
    config.max_position_embeddings = 128
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def llama_cpp_greedy(llm, prompt: list[int], count: int) -> list[int]:
    """The first `count` greedy tokens llama.cpp (a llama_cpp.Llama) generates after `prompt`."""
    tokens = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        tokens.append(token)
        if len(tokens) == count:
            break
    return tokens


def random_adapter(base: Path, path: Path, seed: int) -> Path:
    """An adapter whose B matrices are random (PEFT's init_lora_weights=False), so it visibly moves the model."""
    import torch
    from peft import LoraConfig

    from llmctl.adapters import adapter_state, add_lora
    from llmctl.checkpoint import open_model, save_checkpoint

    torch.manual_seed(seed)
    model = open_model(base)
    config = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    config.base_model_name_or_path = str(base)
    add_lora(model, config)
    return save_checkpoint(path, model.config, adapter_state(model), adapter_config=config)


def server_ready(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serving(*args: str, timeout: float = 180) -> Iterator[str]:
    """`llmctl serve ARGS` in a subprocess on a free port, as a user starts it; yields its base URL once
    /health answers, and stops it (SIGTERM) afterwards."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "serve", *args, "--port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not server_ready(url):
            if server.poll() is not None:
                raise AssertionError(f"llmctl serve {' '.join(args)} exited:\n{server.communicate()[1]}")
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.communicate(timeout=60)


class Terminal:
    """A command on a pseudo-terminal (what the Textual monitor needs), with what it has drawn so far."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.controller, terminal = pty.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.process = subprocess.Popen(
            command, cwd=REPO, stdin=terminal, stdout=terminal, stderr=terminal,
            env={**env, "TERM": "xterm-256color"}, start_new_session=True,
        )  # fmt: skip
        os.close(terminal)
        self.shown: list[bytes] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        with contextlib.suppress(OSError):  # the terminal closes when the command ends
            while chunk := os.read(self.controller, 65536):
                self.shown.append(chunk)

    def stop_with(self, keys: bytes) -> int:
        """Type `keys`; the command's exit code."""
        os.write(self.controller, keys)
        try:
            return self.process.wait(timeout=120)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def text(self) -> str:
        return b"".join(self.shown).decode(errors="replace")
