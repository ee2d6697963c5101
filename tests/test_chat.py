"""`llmctl chat`: the Textual app under its pilot, and the plain REPL from a pipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmctl.infer.chat_session import ChatSession, chat_sampling
from llmctl.infer.decode import load_for_inference, open_chat


def session_for(checkpoint) -> ChatSession:
    model, tokenizer = load_for_inference(checkpoint)
    chat = open_chat(checkpoint, tokenizer)
    return ChatSession(model, tokenizer, chat, settings=chat_sampling(temperature=0.0, max_tokens=12))


def test_plain_mode_from_a_pipe_prints_one_reply(tiny_checkpoint):
    expected = "".join(session_for(tiny_checkpoint).reply("hello"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmctl",
            "chat",
            str(tiny_checkpoint),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


def test_plain_mode_commands(tiny_checkpoint, tmp_path):
    saved = tmp_path / "chat.json"
    script = f"/set temperature 0\n/set top_k many\n/system Be brief.\nhi\n/save {saved}\n/reset\n"
    result = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(tiny_checkpoint), "--plain", "--max-tokens", "5"],
        input=script,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "temperature = 0.0" and lines[1] == "top_k needs a int, got 'many'"
    assert lines[2] == "system prompt set to 'Be brief.'" and lines[-1] == "conversation cleared"
    record = json.loads(saved.read_text())
    assert record["system"] == "Be brief." and [m["role"] for m in record["messages"]] == [
        "user",
        "assistant",
    ]


async def test_textual_app_sends_a_message_and_shows_the_streamed_reply(tiny_checkpoint):
    pytest.importorskip("textual")
    from llmctl.tui.chat import Bubble, ChatApp

    session = session_for(tiny_checkpoint)
    app = ChatApp(session, "tiny")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.click("#prompt")
        await pilot.press(*"hello", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        bubbles = app.query(Bubble)
        assert [b.classes for b in bubbles][:1] == [frozenset({"user"})]
        reply = session.history[-1].content
        assert session.history[-1].role == "assistant"
        shown = str(bubbles[-1].render())
        assert shown == (reply or "(empty reply)")
        assert "tokens/s" in str(app.query_one("#status").render())


def test_plain_mode_reports_mistakes_and_keeps_the_conversation(tiny_checkpoint, tmp_path):
    script = "\n".join(
        [
            "/set top_k -5",
            "/set temperature nan",
            "/set top_p 0",
            "/set temperature 0",
            "hello",
            "word " * 400,  # longer than the 128-token context on its own
            f"/save {tmp_path}",  # a directory
            f"/save {tmp_path / 'chat.json'}",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(tiny_checkpoint), "--plain", "--max-tokens", "4"],
        input=script + "\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "top_k must be 0 (off) or more; got -5",
        "temperature must be 0 to 2; got nan",
        "top_p must be above 0, at most 1; got 0",
        "temperature = 0.0",
    ]
    assert lines[5].startswith("error: the prompt has") and "context is 128 tokens" in lines[5]
    assert lines[6].startswith(f"cannot save to {tmp_path}")
    record = json.loads((tmp_path / "chat.json").read_text())
    assert [m["content"] for m in record["messages"] if m["role"] == "user"] == ["hello"]


def test_a_draft_model_gives_the_same_greedy_reply_and_a_foreign_one_is_refused(
    tiny_checkpoint, sample_pipeline, tmp_path
):
    from llmctl.checkpoint import open_checkpoint, save_checkpoint
    from llmctl.data.tokenizer import open_tokenizer, train_tokenizer
    from llmctl.model.hf_format import export_state_dict

    expected = "".join(session_for(tiny_checkpoint).reply("hello"))
    command = [sys.executable, "-m", "llmctl", "chat", str(tiny_checkpoint), "--temperature", "0"]
    command += ["--max-tokens", "12", "--lookahead", "2", "--draft"]
    result = subprocess.run(
        [*command, str(tiny_checkpoint)], input="hello\n", capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"

    train_tokenizer(sample_pipeline["corpus"], tmp_path / "tokenizer", vocab_size=600)
    model, _ = open_checkpoint(tiny_checkpoint)  # the same shape, another tokenizer
    foreign = save_checkpoint(
        tmp_path / "foreign",
        model.config,
        export_state_dict(model),
        tokenizer=open_tokenizer(tmp_path / "tokenizer" / "tokenizer.model"),
    )
    result = subprocess.run(
        [*command, str(foreign)], input="hello\n", capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "different tokenizer" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_plain_mode_refuses_what_would_break_later_turns(tiny_checkpoint, tmp_path):
    """A max_tokens past the context, a /save into a folder that is not there, a system prompt that leaves
    no room to talk, and bytes that are not UTF-8: each a line, the conversation still answering after."""
    missing = tmp_path / "no" / "such" / "dir" / "chat.json"
    script = b"\n".join(
        [
            b"/set max_tokens 99999999999999999999",
            f"/save {missing}".encode(),
            b"/system " + b"word " * 20000,
            b"caf\xe9 \xff\xfe hello",  # Latin-1 and stray bytes
            b"/set temperature 0",
            b"hello",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(tiny_checkpoint), "--plain", "--max-tokens", "4"],
        input=script + b"\n", capture_output=True, timeout=120,
    )  # fmt: skip
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    lines = stdout.splitlines()
    assert lines[0] == "max_tokens must be below the model's context of 128 tokens"
    assert lines[1] == f"cannot save to {missing}: {missing.parent} is not a directory"
    assert lines[2].startswith("system prompt of ") and "refused: it must leave room to talk" in lines[2]
    assert not (tmp_path / "no").exists()
    assert "temperature = 0.0" in lines[3:]  # after a reply to the undecodable line
