"""`llmctl up DOCS`: one command from a folder of mixed documents to a registered, served model with a card
and a report; re-runs reuse what is unchanged, an interrupted training resumes bitwise, a base is adapted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    REPO,
    Terminal,
    free_port,
    hf_llama_directory,
    one_error_line,
    sample_texts,
    server_ready,
    wait_until,
)
from safetensors.torch import load_file
from test_formats import write_pdf

from llmctl.train.run_log import RunLog

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Steps, not minutes, bound training here, so the runs are short and an interrupted one can be compared.
STEPS = ["--set", "train.max_minutes=0", "--set", "train.steps=40", "--set", "train.eval_every=10"]


def write_documents(folder: Path, texts: list[str]) -> None:
    """The texts as txt, md and html files in nested folders, plus a PDF and a Word document."""
    from docx import Document as WordDocument

    for index, text in enumerate(texts):
        kind = ("txt", "md", "html")[index % 3]
        body = f"<html><body><main><p>{text}</p></main></body></html>" if kind == "html" else text
        target = folder / ("manuals" if index % 2 else "") / f"doc{index}.{kind}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body, encoding="utf-8")
    lines = texts[0][:2000].encode("latin-1", "replace").decode("latin-1").replace("(", "[").replace(")", "]")
    write_pdf(folder / "guide.pdf", [lines[i : i + 90] for i in range(0, len(lines), 90)])
    word = WordDocument()
    word.add_heading("Operating procedure", level=1)
    word.add_paragraph(texts[1][:3000])
    word.save(folder / "procedure.docx")


def up_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmctl", "up", *args]


def up(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        up_command(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, expected: int = 0) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == expected, output
    return output


def stage_lines(output: str) -> dict[str, str]:
    """'name reused: ...' / 'name done in ...' -> name: 'reused' or 'done'."""
    found = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) > 2 and words[1] in ("reused:", "done"):
            found[words[0]] = "reused" if words[1] == "reused:" else "done"
    return found


@pytest.fixture
def environment(tmp_path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONUNBUFFERED": "1",
        "COLUMNS": "200",
    }


def test_up_serves_a_registered_model_reuses_stages_and_resumes_an_interrupted_training(
    tmp_path, environment
):
    from openai import OpenAI

    texts = sample_texts(24)
    docs, out = tmp_path / "docs", tmp_path / "acme"
    write_documents(docs, texts[:20])
    port = free_port()
    first = up(
        str(docs),
        "--out",
        str(out),
        "--budget",
        "3m",
        *STEPS,
        "--serve",
        "--port",
        str(port),
        env=environment,
    )
    try:
        deadline = time.monotonic() + 300
        while not server_ready(f"http://127.0.0.1:{port}"):
            assert first.poll() is None, first.communicate()[0]
            assert time.monotonic() < deadline, "llmctl up never served"
            time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model="model", prompt="The Python", max_tokens=8, temperature=0)
        assert reply.choices[0].text and reply.usage.completion_tokens > 0
    finally:
        first.send_signal(signal.SIGTERM)
        output = first.communicate(timeout=60)[0]
    assert "registered as docs@1" in output, output
    card = (out / "model" / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: transformers")
        and "bits_per_byte" in card
        and "## Limitations" in card
    )
    assert (out / "report" / "report.html").is_file()
    from mlflow import MlflowClient

    version = MlflowClient(environment["MLFLOW_TRACKING_URI"]).get_model_version("docs", "1")
    assert "llmctl.eval.heldout" in version.tags and version.tags["llmctl.weights_sha256"]

    again = stage_lines(finish(up(str(docs), "--out", str(out), "--budget", "3m", *STEPS, env=environment)))
    assert set(again.values()) == {"reused"} and {"corpus", "train", "register", "report"} <= set(again)

    # One more document: corpus onward is redone. Watched with --tui, whose q interrupts the training (as
    # Ctrl-C does), then run again: the training resumes and ends with the weights of an uninterrupted run.
    keys = {name: stage["key"] for name, stage in json.loads((out / "up.json").read_text())["stages"].items()}
    (docs / "added.md").write_text(texts[22], encoding="utf-8")
    started = time.time()
    shown = Terminal(up_command(str(docs), "--out", str(out), "--budget", "3m", *STEPS, "--tui"), environment)
    metrics = out / "train" / "metrics.jsonl"
    wait_until(
        lambda: (
            metrics.is_file()
            and metrics.stat().st_mtime > started
            and RunLog(out / "train").read_all().step >= 10
        ),
        timeout=180,
        message="the new training did not start",
    )
    assert shown.stop_with(b"q") == 130
    assert "continue with: llmctl up" in shown.text()
    stages = json.loads((out / "up.json").read_text())["stages"]
    assert all(
        stages[name]["key"] != keys[name] and stages[name]["done"] for name in ("corpus", "tokenizer", "size")
    )
    assert not stages["train"]["done"]
    resumed = finish(up(str(docs), "--out", str(out), "--budget", "3m", *STEPS, env=environment))
    after = stage_lines(resumed)
    assert after["corpus"] == "reused" and after["train"] == after["register"] == "done", after
    assert "resumed from" in resumed

    ledger = json.loads((out / "up.json").read_text())
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        ledger["stages"]["size"]["result"]["recipe"].replace(str(out / "train"), str(tmp_path / "alone"))
    )
    subprocess.run(
        [sys.executable, "-m", "llmctl", "train", str(recipe)],
        cwd=REPO,
        env=environment,
        check=True,
        capture_output=True,
    )
    step = f"step-{ledger['stages']['train']['result']['steps']:08d}"
    ours = load_file(out / "train" / "checkpoints" / step / "model.safetensors")
    alone = load_file(tmp_path / "alone" / "checkpoints" / step / "model.safetensors")
    assert ours.keys() == alone.keys() and all((ours[name] == alone[name]).all() for name in ours)


def test_up_adapts_a_base_and_its_held_out_perplexity_falls(tmp_path, environment, tiny_checkpoint):
    docs, out = tmp_path / "docs", tmp_path / "adapted"
    write_documents(docs, sample_texts(20))
    settings = ["--set", "quantize.enabled=false", "--set", "chat.share=0.3", "--set", "chat.min_minutes=0"]
    arguments = [str(docs), "--base", str(tiny_checkpoint), "--out", str(out), "--budget", "1m", *settings]
    output = finish(
        up(*arguments, "--set", "train.max_minutes=0", "--set", "train.steps=30", env=environment)
    )
    base = json.loads((out / "evaluate-base.json").read_text())["results"]["perplexity"]
    adapted = json.loads((out / "evaluate.json").read_text())["results"]["perplexity"]
    assert adapted["bits_per_byte"] < base["bits_per_byte"], output
    assert stage_lines(output)["chat"] == "done" and (out / "instructions.jsonl").is_file()
    assert f"adapted from `{tiny_checkpoint}`" in (out / "model" / "README.md").read_text()


def test_the_chat_stage_runs_only_on_a_model_with_a_chat_format(tmp_path, tiny_checkpoint):
    from llmctl.pipeline.training import can_chat

    without = hf_llama_directory(tmp_path / "plain", sample_texts(20), chat_markers=False)
    with_template = hf_llama_directory(
        tmp_path / "chatml", sample_texts(20), special_tokens=("<|im_start|>", "<|im_end|>"),
        tokenizer_config={"chat_template": CHATML},
    )  # fmt: skip
    assert can_chat(tiny_checkpoint) and can_chat(with_template) and not can_chat(without)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "holds no files"),
        ("unreadable", "no .txt, .md"),
        ("budget", "leaves"),
        ("base-file", "is not a model"),
        ("base-folder", "is not a model"),
        ("duration", "give a duration such as 30m"),
        ("stage", "unknown stage 'training'"),
        ("name", "model name 'legal/v2' is not usable"),
        ("tui-serve", "--tui and --serve"),
        ("truthy-string", "--set quantize.enabled='no': expected bool"),
        ("share", "--set chat.share='half': expected float"),
    ],
)
def test_bad_input_is_one_line_before_any_work(tmp_path, llmctl_in_process, case, expected):
    docs, out = tmp_path / "docs", tmp_path / "out"
    docs.mkdir()
    if case != "empty":
        (docs / ("data.bin" if case == "unreadable" else "a.txt")).write_text("Some text. " * 200)
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "folder").mkdir()
    extra = {
        "budget": ["--budget", "5s"],
        "base-file": ["--base", str(tmp_path / "notes.txt")],
        "base-folder": ["--base", str(tmp_path / "folder")],
        "duration": ["--budget", "soon"],
        "stage": ["--set", "training.steps=3"],
        "name": ["--name", "legal/v2"],
        "tui-serve": ["--tui", "--serve"],
        "truthy-string": ["--set", "quantize.enabled=no"],
        "share": ["--set", "chat.share=half"],
    }.get(case, [])
    line = one_error_line(llmctl_in_process("up", str(docs), "--out", str(out), *extra))
    assert expected in line, line
    assert not out.exists()
