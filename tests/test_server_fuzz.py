"""Property-based fuzzing of the server: whatever a client sends, the answer is an OpenAI-shaped 4xx or a
complete response, never a 5xx, a hang or a dead engine, and a normal request succeeds afterwards. Texts
include lone UTF-16 surrogates (JSON's \\ud800 escapes), bodies include invalid UTF-8, and one served model
has no chat template at all."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import hf_llama_directory, running_server, sample_texts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.infer.served import load_served_model
from llmctl.infer.server import create_app

TIMEOUT = 30.0  # a hung request fails the property rather than the suite

anything = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),  # serialized as NaN/Infinity, which Python accepts
        st.text(max_size=40),
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# every code point JSON can carry, lone surrogates included (hypothesis leaves those out unless asked)
texts = st.text(st.characters(exclude_categories=()), max_size=120)
# In-range values and the edges just past them (seeds up to 2**64, probabilities of 0 and 1, zero tokens).
MODELS = ["tiny", "ab", "plain"]  # plain: a tokenizer.json base with no chat template
sampling = {
    "max_tokens": st.integers(0, 24),
    "temperature": st.floats(0, 2) | st.sampled_from([1e-300, 5e-324, 2.0000001]),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, 2000),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": texts | st.lists(texts, max_size=5),
    "seed": st.integers(0, 2**64) | st.sampled_from([2**63 - 1, 2**64 - 1, 2**64, 2**70]),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0, 3),
    "user": texts,
}
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": texts}),
    min_size=1,
    max_size=4,
)
completion = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "prompt": texts | st.lists(texts, min_size=1, max_size=3)},
    optional=sampling,
)
chat = st.fixed_dictionaries(
    {"model": st.sampled_from(MODELS), "messages": messages},
    optional={**sampling, "max_completion_tokens": st.integers(0, 24)},
)
FIELDS = ["model", "prompt", "messages", "max_completion_tokens", *sampling]


def with_one_field_broken(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """A plausible body with one field (present or not) set to any JSON value at all."""
    return st.tuples(bodies, st.sampled_from(FIELDS), anything).map(lambda t: {**t[0], t[1]: t[2]})


def encoded(bodies: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(bodies, bodies, with_one_field_broken(bodies)).map(
        lambda body: json.dumps(body).encode()
    )


def with_invalid_utf8(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """A body with bytes no UTF-8 decoder takes spliced into it (inside a string, most likely)."""
    broken = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    return st.tuples(encoded(bodies), broken, st.integers(0, 10**6)).map(
        lambda t: t[0][: t[2] % len(t[0])] + t[1] + t[0][t[2] % len(t[0]) :]
    )


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), encoded(completion)),
    st.tuples(st.just("/v1/chat/completions"), encoded(chat)),
    st.tuples(st.just("/v1/completions"), with_invalid_utf8(completion)),
    st.tuples(st.just("/v1/chat/completions"), with_invalid_utf8(chat)),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), st.binary(max_size=200)),
)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_checkpoint, tmp_path_factory):
    plain = hf_llama_directory(tmp_path_factory.mktemp("plain") / "base", sample_texts(), chat_markers=False)
    models = {
        "tiny": load_served_model("tiny", tiny_checkpoint, max_batch=4),
        "plain": load_served_model("plain", plain, max_batch=4),
    }
    app = create_app(models, routes={"ab": [("tiny", 1.0)]}, max_concurrency=8)
    with running_server(app) as running, httpx.Client(base_url=running.url, timeout=TIMEOUT) as client:
        yield client


def assert_openai_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests)
def test_no_request_gets_a_5xx_a_hang_or_a_dead_engine(fuzzed_server, request):
    path, body = request
    headers = {"Content-Type": "application/json"}
    with fuzzed_server.stream("POST", path, content=body, headers=headers) as response:
        if response.status_code != 200:
            response.read()
            assert_openai_error(response)
        elif response.headers["content-type"].startswith("text/event-stream"):
            events = [line for line in response.iter_lines() if line.startswith("data:")]
            assert events and events[-1] == "data: [DONE]", events[-3:]
        else:
            response.read()
            assert response.json()["choices"]
    assert fuzzed_server.get("/health").status_code == 200


def test_after_the_fuzz_a_normal_request_succeeds(fuzzed_server):
    response = fuzzed_server.post(
        "/v1/completions", json={"model": "tiny", "prompt": "The Python", "max_tokens": 4, "temperature": 0}
    )
    assert response.status_code == 200 and response.json()["choices"][0]["text"]
