"""Tool calls on /v1/chat/completions through the official `openai` client: tools rendered by the model's
own template (as transformers renders them), the Hermes and Llama call syntaxes parsed into `tool_calls`, and
`tool_choice` "required" or a named function enforced by a grammar, streamed and not."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from conftest import hf_llama_directory, running_server, sample_texts

from llmctl.data.chat import Message
from llmctl.data.chat_format import open_chat_format
from llmctl.data.tokenizer import open_tokenizer
from llmctl.infer.served import load_served_model
from llmctl.infer.server import create_app
from llmctl.infer.tools import HERMES, LLAMA, parse_tool_calls

transformers = pytest.importorskip("transformers")
pytest.importorskip("llguidance")

QWEN3 = Path(__file__).parent / "data" / "chat_templates" / "qwen3.jinja"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 12},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
ALERT = {
    "type": "object",
    "properties": {"level": {"enum": ["low", "high"]}, "loud": {"type": "boolean"}},
    "required": ["level", "loud"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "A forecast", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "raise_alert", "description": "An alarm", "parameters": ALERT}},
]
SCHEMAS = {"get_weather": WEATHER, "raise_alert": ALERT}
ASK = [{"role": "user", "content": "Will it rain in Oslo?"}]


@pytest.fixture(scope="module")
def qwen_directory(tmp_path_factory) -> Path:
    """A tiny random Llama-architecture model with a byte-level tokenizer and Qwen 3's template, which takes
    tools and teaches Hermes' <tool_call> syntax."""
    directory = hf_llama_directory(
        tmp_path_factory.mktemp("tools") / "qwen",
        sample_texts(),
        chat_markers=False,
        special_tokens=("<|im_start|>", "<|im_end|>"),
        tokenizer_config={"chat_template": QWEN3.read_text(), "eos_token": "<|im_end|>"},
    )
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    return directory


@pytest.fixture(scope="module")
def server(qwen_directory, tiny_checkpoint):
    models = {
        "qwen": load_served_model("qwen", qwen_directory, max_batch=4),
        "plain": load_served_model("plain", tiny_checkpoint, max_batch=2),  # llmctl's own format: no tools
    }
    with running_server(create_app(models)) as running:
        yield running.url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_tools_and_tool_turns_render_as_transformers_renders_them(qwen_directory):
    conversation = [
        Message("user", "Weather in Oslo?"),
        Message(
            "assistant",
            "",
            tool_calls=(
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "celsius", "days": 2}',
                    },
                },
            ),
        ),
        Message("tool", '{"rain": true}', tool_call_id="call_1"),
    ]
    ours = open_chat_format(qwen_directory, open_tokenizer(qwen_directory))
    assert ours.takes_tools
    theirs = transformers.AutoTokenizer.from_pretrained(qwen_directory)
    expected = theirs.apply_chat_template(
        [message.as_template_input() for message in conversation],
        tools=TOOLS,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ours.render(conversation, tools=TOOLS) == expected
    assert "<tool_call>" in expected and "get_weather" in expected and "<tool_response>" in expected


def validated(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def ask(client, **options):
    """The weather question with both tools, sampled: the grammar, not the random model, makes the calls."""
    return client.chat.completions.create(
        model="qwen", messages=ASK, tools=TOOLS, max_tokens=300, temperature=1.0, **options
    )


def test_required_tool_choice_returns_calls_that_validate(client):
    for seed in range(2):
        result = ask(client, tool_choice="required", seed=seed)
        choice = result.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            validated(call)


def test_a_named_function_and_no_parallel_calls(client):
    named = {"type": "function", "function": {"name": "raise_alert"}}
    result = ask(client, tool_choice=named, parallel_tool_calls=False, seed=3)
    (call,) = result.choices[0].message.tool_calls
    assert call.function.name == "raise_alert" and validated(call)["level"] in ("low", "high")


def test_streamed_tool_calls(client):
    stream = ask(client, tool_choice="required", seed=7, stream=True)
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"name": "", "arguments": ""})
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls and "<tool_call>" not in content
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_a_tool_result_turn_is_answered(client):
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_9",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Oslo", "unit": "celsius", "days": 1}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_9", "content": '{"rain": false}'},
    ]
    result = client.chat.completions.create(
        model="qwen", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5, temperature=0
    )
    assert result.choices[0].message.tool_calls is None and result.choices[0].finish_reason in (
        "stop",
        "length",
    )


def test_tools_on_a_template_without_them_and_bad_choices_are_400(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="plain", messages=ASK, tools=TOOLS, max_tokens=5)
    assert (
        refused.value.body["code"] == "tools_unsupported"
        and "takes no tools" in refused.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(
            model="qwen",
            messages=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert unknown.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen", messages=ASK, tool_choice="required")


def test_hermes_and_llama_calls_are_parsed_and_anything_else_is_content():
    names = {"get_weather", "raise_alert"}
    text = (
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "raise_alert", "arguments": {"level": "low"}}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text, HERMES, names)
    assert content == "Checking." and [c.name for c in calls] == ["get_weather", "raise_alert"]
    assert json.loads(calls[0].arguments) == {"city": "Oslo"}
    content, calls = parse_tool_calls(
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', LLAMA, names
    )
    assert content is None and json.loads(calls[0].arguments) == {"city": "Rome"}
    for plain in (
        "No tools needed.",
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>',
        "{oops",
    ):
        assert parse_tool_calls(plain, HERMES, names) == (plain, [])
    assert parse_tool_calls('{"name": "get_weather", "parameters": 3}', LLAMA, names)[1] == []
