"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on localhost."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from llmctl.infer.served import load_served_model
from llmctl.infer.server import create_app

API_KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    models = {
        "tiny": load_served_model("tiny", tiny_checkpoint, max_batch=4),
        "other": load_served_model("other", tiny_checkpoint, max_batch=2),
    }
    app = create_app(
        models, routes={"ab": [("tiny", 0.5), ("other", 0.5)]}, api_key=API_KEY, max_concurrency=8
    )
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_models_and_aliases(client):
    assert {model.id for model in client.models.list()} == {"tiny", "other", "ab"}


def test_completion(client):
    result = client.completions.create(model="tiny", prompt="The Python", max_tokens=8, temperature=0)
    assert result.object == "text_completion" and result.model == "tiny"
    assert result.choices[0].finish_reason in ("length", "stop") and result.choices[0].text
    assert result.usage.completion_tokens <= 8 and result.usage.prompt_tokens > 0
    again = client.completions.create(model="tiny", prompt="The Python", max_tokens=8, temperature=0)
    assert again.choices[0].text == result.choices[0].text  # greedy is deterministic


def test_chat_completion_and_n_choices(client):
    result = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        n=2,
        temperature=1.0,
        seed=1,
    )
    assert result.object == "chat.completion" and len(result.choices) == 2
    assert all(choice.message.role == "assistant" for choice in result.choices)
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streamed_chat_completion_with_usage(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me about lists"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    whole = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me about lists"}],
        max_tokens=10,
        temperature=0,
    )
    assert text == whole.choices[0].message.content


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model="tiny", prompt="def", max_tokens=12, temperature=0).choices[0].text
    stop = free.strip()[2:4] or free[:2]
    cut = client.completions.create(model="tiny", prompt="def", max_tokens=12, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop"
    assert free.startswith(cut.choices[0].text)


def test_wrong_api_key_is_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 10_000}, "max_tokens"),
        ({"model": "tiny", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "tiny", "prompt": "word " * 400}, "prompt"),
        ({"model": "tiny", "prompt": 42}, "prompt"),
        ({"model": "tiny"}, "prompt"),
        ({"model": "tiny", "prompt": "x", "logprobs": 3}, "logprobs"),
    ],
)
def test_bad_parameters_get_400_with_an_openai_error_body(client, server, body, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**body) if "prompt" in body else client.post(
            "/completions", cast_to=object, body=body
        )
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"].startswith(param) and error["message"]
    assert httpx.get(f"{server}/health").status_code == 200  # the server stays up


def test_malformed_bodies_are_400_never_500(server):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for payload in [
        "{not json",
        '{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}',
        '{"model": "tiny", "messages": "hi"}',
        "[]",
    ]:
        response = httpx.post(f"{server}/v1/chat/completions", content=payload, headers=headers)
        assert response.status_code == 400, payload
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    unknown = httpx.post(f"{server}/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_alias_routes_to_both_models_and_metrics_count_them(client, server):
    seen = {client.completions.create(model="ab", prompt="x", max_tokens=1).model for _ in range(24)}
    assert seen == {"tiny", "other"}
    text = httpx.get(f"{server}/metrics").text
    assert 'llmctl_requests_total{endpoint="text_completion",finish_reason="length",model="other"}' in text
    assert "llmctl_time_to_first_token_seconds_bucket" in text and 'llmctl_queue_depth{model="tiny"}' in text


def test_client_disconnect_frees_the_slot(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "other", "prompt": "x", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # read one event, then hang up
    deadline = time.time() + 10
    while httpx.get(f"{server}/health").json()["models"]["other"]["active"] != 0:
        assert time.time() < deadline, "the disconnected request kept its slot"
        time.sleep(0.05)


def test_over_the_concurrency_limit_is_429(client):
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, n=9)


def test_a_checkpoint_that_cannot_load_is_reported_at_start(llmctl, tmp_path):
    result = llmctl("serve", f"broken={tmp_path}", "--port", str(free_port()))
    assert result.returncode == 2 and "not a checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_shutdown_drains_in_flight_streams(tiny_checkpoint):
    app = create_app({"tiny": load_served_model("tiny", tiny_checkpoint, max_batch=2)})
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    while not instance.started:
        time.sleep(0.05)
    body = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:
                    instance.should_exit = True  # what SIGTERM does
    thread.join(timeout=60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] >= 1
    assert not thread.is_alive()
