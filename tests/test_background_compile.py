"""Fast by default: where the fused step does not serve every step (tests/test_decode_step.py), chat and serve
compile their decode step in a background thread while the eager step answers (the engine's side:
tests/test_compiled_decode.py's fixture); a failure leaves the eager step, the compiled artefacts are kept in
a per-user cache across runs, and `llmctl serve` does it without flags."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from conftest import REPO, decisive_model, free_port, server_ready

from llmctl.infer import decode
from llmctl.infer.background_compile import CACHE_VARIABLE, compile_in_background, keep_compiled_artefacts
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams


def test_a_failed_compile_is_reported_and_the_eager_step_stays(monkeypatch):
    model = decisive_model(seed=4)

    def broken(model):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr("llmctl.infer.background_compile.compiled_step", broken)
    reports: list[str] = []
    compile_in_background(model, 1, reports.append).join(60)
    assert reports == [
        "compiling the decode step failed (RuntimeError: no C++ compiler); staying on the eager step"
    ]
    assert model not in decode._compiled_steps
    assert list(generate_ids(model, [1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.0)))


def test_compiled_artefacts_go_to_a_per_user_cache_unless_one_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert keep_compiled_artefacts() == tmp_path / "llmctl" / "torchinductor"
    assert os.environ[CACHE_VARIABLE] == str(tmp_path / "llmctl" / "torchinductor")
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "mine"))
    assert keep_compiled_artefacts() == tmp_path / "mine"


def test_llmctl_serve_without_flags_answers_at_once_and_compiles_in_the_background(tiny_checkpoint):
    """More rows than the fused step takes (llmctl.infer.fused_step), so the engine's steps of 17 rows need the
    compiled step."""
    import httpx

    env = {key: value for key, value in os.environ.items() if key != "LLMCTL_COMPILE"}
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "serve", str(tiny_checkpoint), "--port", str(port), "--max-batch", "17"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True)
    reader.start()
    body = {"model": tiny_checkpoint.name, "prompt": "The daemon", "max_tokens": 24, "temperature": 0}
    try:
        while not server_ready(url):
            assert server.poll() is None, "".join(lines)
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        for _ in range(600):
            if any("decode step compiled" in line for line in lines) or server.poll() is not None:
                break
            threading.Event().wait(1)
        assert any("decode step compiled" in line for line in lines), "".join(lines)
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert again == first
    finally:
        server.terminate()
        server.wait(60)
