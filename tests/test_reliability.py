"""Inputs a careless or hostile user sends, each through the real command or HTTP endpoint: adapters at the
command line, decompression bombs, two trainers on one run directory, text no tokenizer takes, and a chat
request to a model that cannot render one."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import (
    REPO,
    hf_llama_directory,
    one_error_line,
    random_adapter,
    running_server,
    sample_texts,
    serving,
    tiny_recipe_dict,
)

from llmctl.errors import UserError

# -- serve --adapter, as the README writes it ---------------------------------------------------------------


def test_serve_takes_several_adapters_on_the_command_line(tiny_checkpoint, tmp_path):
    legal = random_adapter(tiny_checkpoint, tmp_path / "legal", seed=1)
    hr = random_adapter(tiny_checkpoint, tmp_path / "hr", seed=2)
    with serving(str(tiny_checkpoint), "--adapter", f"legal={legal}", "--adapter", str(hr)) as url:
        served = [model["id"] for model in httpx.get(f"{url}/v1/models").json()["data"]]
        assert served == ["tiny", "legal", "hr"]
        replies = {}
        for name in served:
            body = {"model": name, "prompt": "The server", "max_tokens": 6, "temperature": 0}
            response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            assert response.status_code == 200 and response.json()["model"] == name
            replies[name] = response.json()["choices"][0]["text"]
    assert len(set(replies.values())) == 3  # each adapter really answers with its own weights


# -- decompression bombs ------------------------------------------------------------------------------------


PEAK_MEMORY = """
import atexit, sys
def report():
    status = open("/proc/self/status").read()
    peak = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    open("peak.txt", "w").write(peak.split()[1])
atexit.register(report)
sys.argv = ["llmctl", *sys.argv[1:]]
from llmctl.cli import main
main()
"""


def run_measured(*args: str, cwd: Path) -> tuple[int, str, float]:
    """`llmctl ARGS` in a subprocess: (exit code, stderr, peak resident memory in MB). The peak is the
    process's own (VmHWM): a child's rusage would count the test process it was forked from."""
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, *args],
        cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result.returncode, result.stderr, int((cwd / "peak.txt").read_text()) / 1024


GOOD = sample_texts(2)
BOMB_BYTES = 256 << 20  # four times the default 64 MiB document limit
MEMORY_MB = 700  # a python with torch and the corpus stack is ~300 MB; the bombs alone would add 1 GB+


def test_a_gzip_line_that_expands_past_the_limit_is_skipped_in_bounded_memory(tmp_path):
    bomb = tmp_path / "notes.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as out:
        out.write((json.dumps({"text": GOOD[0]}) + "\n").encode())
        out.write(b'{"text": "')
        block = b"a" * (1 << 20)
        for _ in range(BOMB_BYTES // len(block)):
            out.write(block)
        out.write(b'"}\n')
        out.write((json.dumps({"text": GOOD[1]}) + "\n").encode())
    assert bomb.stat().st_size < 2 << 20
    code, stderr, peak = run_measured("corpus", "build", str(bomb), "--out", "corpus", cwd=tmp_path)
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["documents_read"] == 2  # the lines on either side of the bomb
    (problem,) = manifest["problems"]
    assert problem["location"] == f"{bomb}:2" and "67,108,864-byte document limit" in problem["reason"]
    assert peak < MEMORY_MB, f"peak memory {peak:.0f} MB"


def test_a_docx_zip_bomb_is_skipped_before_it_is_parsed(tmp_path):
    import docx

    plain = tmp_path / "plain.docx"
    document = docx.Document()
    document.add_paragraph(GOOD[0])
    document.save(plain)
    bomb = tmp_path / "bomb.docx"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for part in source.infolist():
            data = source.read(part)
            if part.filename == "word/document.xml":
                head, tail = data.split(b"<w:body>")
                run = b"<w:p><w:r><w:t>" + b"x" * BOMB_BYTES + b"</w:t></w:r></w:p>"
                data = head + b"<w:body>" + run + tail
            out.writestr(part, data)
    assert bomb.stat().st_size < 2 << 20
    code, stderr, peak = run_measured(
        "corpus", "build", str(bomb), str(plain), "--out", "corpus", "--val-fraction", "0", cwd=tmp_path
    )
    assert code == 0, stderr
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 1
    (problem,) = manifest["problems"]
    assert problem["location"] == str(bomb) and "document limit" in problem["reason"]
    assert peak < MEMORY_MB, f"peak memory {peak:.0f} MB"


def test_the_limit_is_a_flag_and_zstd_jsonl_reads_line_by_line(tmp_path):
    import zstandard

    from llmctl.data.sources import read_documents

    texts = sorted(GOOD, key=len)
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    notes = tmp_path / "notes.jsonl.zst"
    notes.write_bytes(zstandard.ZstdCompressor().compress(lines))
    assert [d.text for d in read_documents([notes])] == texts
    short = len(json.dumps({"text": texts[0]}).encode()) + 1  # the first line fits, the second does not
    first, second = read_documents([notes], limit=short)
    assert first.text == texts[0] and f"{short:,}-byte document limit" in second.reason


# -- one run per directory ----------------------------------------------------------------------------------


def _claim(run_dir: Path, start, results) -> None:
    from llmctl.train.run_dir import claim_run_dir

    start.wait()
    try:
        lock = claim_run_dir(run_dir, None, False)
    except UserError as error:
        results.put(("refused", str(error)))
        return
    time.sleep(0.2)  # a run's life: long enough for the other to try while this one holds the directory
    results.put(("ran", str(os.getpid())))
    lock.release()


def test_two_claims_started_together_never_both_hold_the_directory(tmp_path):
    context = multiprocessing.get_context("fork")  # cheap: this process has everything imported
    for attempt in range(20):
        run_dir = tmp_path / f"run-{attempt}"
        start, results = context.Barrier(2), context.Queue()
        claims = [context.Process(target=_claim, args=(run_dir, start, results)) for _ in range(2)]
        for process in claims:
            process.start()
        outcomes = sorted(results.get(timeout=30) for _ in claims)
        for process in claims:
            process.join(30)
        assert [outcome[0] for outcome in outcomes] == ["ran", "refused"], outcomes
        (_, holder), (_, refusal) = outcomes
        assert f"{run_dir} is in use by another run (PID {holder})" in refusal


@pytest.mark.slow
def test_two_trainers_started_together_on_one_directory(sample_pipeline, tmp_path):
    import tomli_w

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_dict(sample_pipeline, tmp_path / "run", steps=12)))
    command = [sys.executable, "-m", "llmctl", "train", str(recipe)]
    trainers = [
        subprocess.Popen(
            command,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outcomes = [trainer.communicate(timeout=300) for trainer in trainers]
    codes = sorted(trainer.returncode for trainer in trainers)
    assert codes == [0, 2], outcomes
    refusal = next(err for trainer, (_, err) in zip(trainers, outcomes, strict=True) if trainer.returncode)
    assert "is in use by another run (PID" in refusal or "holds an earlier run" in refusal
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    steps = [record["step"] for record in records if record["event"] == "step"]
    assert steps == list(range(1, 13))  # one run's steps, never two interleaved


# -- text the server cannot tokenize or template ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_models(tiny_checkpoint, tmp_path_factory):
    """llmctl's own checkpoint, and a tokenizer.json base without llmctl's chat markers or a template."""
    from llmctl.infer.served import load_served_model
    from llmctl.infer.server import create_app

    plain = hf_llama_directory(tmp_path_factory.mktemp("plain") / "base", sample_texts(), chat_markers=False)
    models = {
        "tiny": load_served_model("tiny", tiny_checkpoint, max_batch=2),
        "plain": load_served_model("plain", plain, max_batch=2),
    }
    with running_server(create_app(models)) as running, httpx.Client(base_url=running.url) as client:
        yield client


def openai_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_is_a_400_not_a_500(two_models, stream):
    def post(path: str, body: dict) -> httpx.Response:  # json.dumps escapes a surrogate as JSON allows
        return two_models.post(path, content=json.dumps(body), headers={"content-type": "application/json"})

    completion = {"model": "tiny", "prompt": "ab\ud800cd", "max_tokens": 2, "stream": stream}
    message = openai_error(post("/v1/completions", completion), 400, "invalid_unicode")
    assert "U+D800" in message
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "\udfff"}], "stream": stream}
    openai_error(post("/v1/chat/completions", chat), 400, "invalid_unicode")
    assert two_models.get("/health").status_code == 200


def test_chat_on_a_model_without_a_chat_template_is_a_400(two_models):
    chat = {"model": "plain", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    message = openai_error(
        two_models.post("/v1/chat/completions", json=chat), 400, "chat_template_unavailable"
    )
    assert "/v1/completions" in message
    completion = {"model": "plain", "prompt": "hello", "max_tokens": 2}
    assert two_models.post("/v1/completions", json=completion).status_code == 200


def test_invalid_utf8_in_a_body_is_a_400(two_models):
    body = b'{"model": "tiny", "prompt": "caf\xc3\x28 \xff", "max_tokens": 2}'
    response = two_models.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


# -- a corpus too small to hold anything out -----------------------------------------------------------------


def test_a_corpus_with_no_held_out_window_trains_without_evaluation(
    sample_pipeline, tmp_path, llmctl_in_process
):
    """Two long documents leave the validation split empty: training runs and says it measures no held-out
    loss, instead of refusing to start."""
    import tomli_w

    texts = sorted(sample_texts(400), key=len)[-2:]
    source = tmp_path / "two.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    corpus, tokens = tmp_path / "corpus", tmp_path / "tokens"
    llmctl_in_process("corpus", "build", str(source), "--out", str(corpus), "--val-fraction", "0", check=True)
    llmctl_in_process(
        "tokenize",
        "encode",
        str(corpus),
        "--tokenizer",
        str(sample_pipeline["tokenizer"]),
        "--out",
        str(tokens),
        check=True,
    )
    recipe = tiny_recipe_dict({"tokens": tokens, "tokenizer": sample_pipeline["tokenizer"]}, tmp_path / "run")
    (tmp_path / "tiny.toml").write_text(tomli_w.dumps(recipe))
    trained = llmctl_in_process("train", str(tmp_path / "tiny.toml"), check=True)
    assert "no held-out loss: the validation split is shorter than one window" in trained.stdout
    events = [json.loads(line)["event"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert "eval" not in events and events[-1] == "finished"


# -- issue 39, medium 11: what was a traceback is one line ------------------------------------------------------


def test_an_adapter_forced_onto_a_base_of_another_shape_is_one_line(
    tiny_checkpoint, sample_pipeline, tmp_path
):
    import torch

    from llmctl.adapters import open_adapted
    from llmctl.checkpoint import save_checkpoint
    from llmctl.data.tokenizer import open_tokenizer
    from llmctl.model import ModelConfig, Transformer
    from llmctl.model.hf_format import export_state_dict

    adapter = random_adapter(tiny_checkpoint, tmp_path / "adapter", seed=0)
    wider = ModelConfig(
        vocab_size=1024, d_model=96, n_layer=2, n_head=4, n_kv_head=2, d_ff=128, max_seq_len=128
    )
    other = save_checkpoint(
        tmp_path / "wider",
        wider,
        export_state_dict(Transformer(wider)),
        tokenizer=open_tokenizer(sample_pipeline["tokenizer"]),
    )
    torch.manual_seed(0)
    with pytest.raises(UserError, match=r"does not fit this base \(size mismatch for .*lora_A"):
        open_adapted(adapter, base=other, force=True)


def test_a_damaged_corpus_manifest_is_one_line_in_quantize_calibrate(
    tiny_checkpoint, sample_pipeline, tmp_path, llmctl_in_process
):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(sample_pipeline["corpus"], corpus)
    (corpus / "manifest.json").write_text("{not json")
    out = tmp_path / "q"
    line = one_error_line(
        llmctl_in_process(
            "quantize",
            str(tiny_checkpoint),
            "--method",
            "int8",
            "--out",
            str(out),
            "--calibrate",
            str(corpus),
        )
    )
    assert "manifest.json is damaged" in line and "llmctl corpus build" in line
    assert not out.exists()


def test_a_checkpoints_weights_are_as_readable_as_its_other_files(tiny_checkpoint):
    """Issue 39, low: safetensors wrote the weights 0600 while the rest of the checkpoint was 0644."""
    modes = {path.name: path.stat().st_mode & 0o777 for path in tiny_checkpoint.iterdir() if path.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask(), modes


def test_finetune_base_naming_a_file_says_so(tiny_checkpoint, sample_pipeline, tmp_path):
    from llmctl.recipe import recipe_from_dict
    from llmctl.train.finetune import finetune_recipe

    raw = tiny_recipe_dict(sample_pipeline, tmp_path / "run")
    raw["finetune"] = {"base": str(tiny_checkpoint / "model.safetensors"), "method": "lora"}
    with pytest.raises(UserError, match="it is a file; name the checkpoint directory"):
        finetune_recipe(recipe_from_dict(raw))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- issue 39: automatic fallback -------------------------------------------------------------------------------


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)  # A's loop dies on purpose
def test_killing_a_variants_engine_mid_load_loses_no_client_request(tiny_checkpoint):
    """`serve A=.. B=.. --route bot=A:1.0 --fallback bot=B`: A's engine loop dies while 16 clients stream
    from it; every client gets a whole reply (the rest of an interrupted one from B), none sees an error."""
    import threading

    from llmctl.infer.served import load_served_model
    from llmctl.infer.server import create_app

    a = load_served_model("A", tiny_checkpoint, max_batch=16)
    b = load_served_model("B", tiny_checkpoint, max_batch=16)
    app = create_app({"A": a, "B": b}, routes={"bot": [("A", 1.0)]}, fallbacks={"bot": "B"})
    results: list[dict] = []

    def client(index: int, url: str) -> None:
        body = {
            "model": "bot",
            "prompt": f"Request {index}",
            "max_tokens": 60,
            "temperature": 0.8,
            "seed": index,
        }
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        outcome = {"models": set(), "errors": [], "finish": None, "tokens": 0, "status": None}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            outcome["status"] = response.status_code
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    outcome["errors"].append(event["error"])
                    continue
                outcome["models"].add(event["model"])
                for choice in event["choices"]:
                    outcome["finish"] = choice["finish_reason"] or outcome["finish"]
                if event.get("usage"):
                    outcome["tokens"] = event["usage"]["completion_tokens"]
        results.append(outcome)

    def kill_the_loop() -> None:
        raise RuntimeError("a bug in A's loop")  # outside any request: the loop thread dies

    with running_server(app) as running:
        threads = [threading.Thread(target=client, args=(index, running.url)) for index in range(16)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while a.engine.decode_steps < 5:  # mid-load: replies are streaming from A
            assert time.monotonic() < deadline
            time.sleep(0.01)
        a.engine._admit = kill_the_loop
        for thread in threads:
            thread.join(180)
        health = httpx.get(f"{running.url}/health")
        metrics = httpx.get(f"{running.url}/metrics").text
    assert len(results) == 16
    assert all(r["status"] == 200 and not r["errors"] for r in results), results
    assert all(r["models"] <= {"A", "B"} and r["finish"] in ("length", "stop") for r in results), results
    assert all(r["tokens"] >= 1 for r in results)
    assert any("B" in r["models"] for r in results)  # some were finished by the fallback
    assert health.status_code == 200  # B can serve the alias, whatever A's state
    assert 'llmctl_fallbacks_total{alias="bot",fallback="B",model="A"}' in metrics


def test_a_variant_with_a_full_batch_already_waiting_sends_new_requests_to_the_fallback(
    tiny_checkpoint, monkeypatch
):
    from llmctl.infer.served import load_served_model
    from llmctl.infer.server import create_app

    a = load_served_model("A", tiny_checkpoint, max_batch=2)
    b = load_served_model("B", tiny_checkpoint, max_batch=2)
    app = create_app({"A": a, "B": b}, routes={"bot": [("A", 1.0)]}, fallbacks={"bot": "B"})
    body = {"model": "bot", "prompt": "x", "max_tokens": 2}
    with running_server(app) as running:
        assert httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).json()["model"] == "A"
        monkeypatch.setattr(a.engine, "queue_depth", lambda: 2)  # a full batch waits on A
        assert httpx.post(f"{running.url}/v1/completions", json=body, timeout=60).json()["model"] == "B"
