"""Open models' own chat templates (tests/data/chat_templates: Llama 3, Qwen3, SmolLM2's ChatML with a default
system prompt, and ChatML with generation markers): llmctl renders each as transformers' apply_chat_template
does, stops a reply at the template's end token, and trains only on the assistant's replies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, hf_llama_directory, one_error_line, run_llmctl, sample_texts

from llmctl.data.chat import Message
from llmctl.data.chat_format import open_chat_format
from llmctl.data.instructions import pack_examples, tokenize_example
from llmctl.data.tokenizer import open_tokenizer

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# template -> (its special tokens, bos, the end-of-turn token and the generation config's eos list)
FAMILIES = {
    "llama3": (("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>"),
    "qwen3": (("<|im_start|>", "<|im_end|>", "<|endoftext|>"), None, "<|im_end|>"),
    "smollm2": (("<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>"),
    "chatml-generation": (("<|im_start|>", "<|im_end|>"), None, "<|im_end|>"),
}  # fmt: skip
WITH_SYSTEM = [
    Message("system", "Answer in one sentence."),
    Message("user", "What is a daemon?"),
    Message("assistant", "A background process."),
    Message("user", "And a socket?"),
    Message("assistant", "An endpoint for sending and receiving data."),
]
WITHOUT_SYSTEM = WITH_SYSTEM[1:]


def model_directory(root: Path, family: str) -> Path:
    """A tiny model with a tokenizer that has the template's special tokens, its template in
    tokenizer_config.json, and the end-of-turn token in generation_config.json's eos list."""
    specials, bos, end = FAMILIES[family]
    config = {"chat_template": (TEMPLATES / f"{family}.jinja").read_text(), "eos_token": end}
    if bos is not None:
        config["bos_token"] = bos
    directory = hf_llama_directory(
        root / family, sample_texts(), chat_markers=False, special_tokens=specials, tokenizer_config=config
    )
    tokenizer = open_tokenizer(directory)
    stops = [tokenizer.piece_id(end), tokenizer.piece_id("</s>")]
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps(generation | {"eos_token_id": stops}))
    return directory


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, model_directory(tmp_path_factory.mktemp("templates"), request.param)


def as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": message.role, "content": message.content} for message in messages]


@pytest.mark.parametrize("messages", [WITH_SYSTEM, WITHOUT_SYSTEM, WITHOUT_SYSTEM[:1]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_apply_chat_template(family, messages, add_generation_prompt):
    _, directory = family
    ours = open_chat_format(directory, open_tokenizer(directory))
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    expected = theirs.apply_chat_template(
        as_dicts(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.render(messages, add_generation_prompt) == expected


def test_a_default_system_prompt_is_the_templates(family):
    name, directory = family
    rendered = open_chat_format(directory, open_tokenizer(directory)).render(WITHOUT_SYSTEM[:1])
    assert ("You are a helpful AI assistant named SmolLM" in rendered) == (name == "smollm2")


def test_the_loss_covers_each_reply_and_its_end_token_only(family):
    name, directory = family
    tokenizer = open_tokenizer(directory)
    chat = open_chat_format(directory, tokenizer)
    example = tokenize_example(WITH_SYSTEM, tokenizer, chat)
    end = FAMILIES[name][2]
    trained = example.ids[example.loss]
    pieces = [tokenizer.token_text(int(token)) for token in trained]
    assert pieces.count(end) == 2  # each reply's end token is learnt: generation stops there
    replies = tokenizer.decode(trained.tolist())  # special tokens are skipped when decoding
    assert replies.replace(" ", "") == (WITH_SYSTEM[2].content + WITH_SYSTEM[4].content).replace(" ", "")
    assert not example.loss[: len(tokenizer.encode(chat.render(WITH_SYSTEM[:2])))].any()  # no prompt token


def test_an_eos_inside_an_example_does_not_cut_its_attention(family):
    """ChatML ends every turn with eos (<|im_end|>): packed examples keep attention by example, not by eos."""
    _, directory = family
    tokenizer = open_tokenizer(directory)
    chat = open_chat_format(directory, tokenizer)
    examples = [
        tokenize_example(WITH_SYSTEM, tokenizer, chat),
        tokenize_example(WITHOUT_SYSTEM, tokenizer, chat),
    ]
    packed = pack_examples(examples, 256, tokenizer.pad_id, packing=True, overlong="skip")
    first = len(examples[0].ids)
    assert (packed.segments[0, :first] == 0).all() and (packed.segments[0, first:] == 1).all()
    assert (examples[0].ids == tokenizer.eos_id).sum() >= 2  # eos inside: an eos-cut mask would split it


def test_chat_stops_at_the_templates_end_token(family):
    """A model whose every pick is the end-of-turn token replies with nothing and stops after one token."""
    from llmctl.infer.chat_session import ChatSession, chat_sampling
    from llmctl.infer.decode import load_for_inference, open_chat

    name, directory = family
    model, tokenizer = load_for_inference(directory)
    end = tokenizer.piece_id(FAMILIES[name][2])

    class EndOfTurn(torch.nn.Module):
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(*hidden.shape[:-1], model.config.vocab_size)
            logits[..., end] = 1.0
            return logits

    model.lm_head = EndOfTurn()
    session = ChatSession(model, tokenizer, open_chat(directory, tokenizer), settings=chat_sampling(0.0, 50))
    assert "".join(session.reply("hello")) == ""
    assert end in session.chat.stop_ids and tokenizer.eos_id in session.chat.stop_ids


def test_a_base_without_a_template_is_refused_naming_the_flag_which_then_works(tmp_path):
    plain = hf_llama_directory(
        tmp_path / "plain", sample_texts(), chat_markers=False, special_tokens=("<|im_start|>", "<|im_end|>")
    )
    line = one_error_line(run_llmctl("chat", str(plain), "--plain"))
    assert "has no chat template" in line and "--chat-template FILE" in line
    chat = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(plain), "--chat-template", str(TEMPLATES / "smollm2.jinja"),
         "--plain", "--max-tokens", "4", "--temperature", "0"],
        input="Which port?\n", capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr


def test_llmctls_own_tokenizer_keeps_its_marker_template(tiny_checkpoint):
    tokenizer = open_tokenizer(tiny_checkpoint)
    chat = open_chat_format(tiny_checkpoint, tokenizer)
    assert chat.render(WITHOUT_SYSTEM[:1]) == "<|user|>\nWhat is a daemon?<|end|>\n<|assistant|>\n"
    example = tokenize_example(WITHOUT_SYSTEM, tokenizer, chat)
    assert example.ids[0] == tokenizer.bos_id and example.ids[-1] == tokenizer.eos_id
    assert np.count_nonzero(example.ids[example.loss] == tokenizer.piece_id("<|end|>")) == 2
