"""The OpenAI-compatible server, driven by the official `openai` client over real HTTP on localhost."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest
from conftest import free_port, running_server, wait_until

from llmctl.infer.decode import load_for_inference
from llmctl.infer.engine import Engine
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.served import ServedModel, load_served_model
from llmctl.infer.server import create_app

API_KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    models = {
        "tiny": load_served_model("tiny", tiny_checkpoint, max_batch=4, prefix_cache_tokens=1024),
        "other": load_served_model("other", tiny_checkpoint, max_batch=2),
    }
    app = create_app(
        models, routes={"ab": [("tiny", 0.5), ("other", 0.5)]}, api_key=API_KEY, max_concurrency=8
    )
    with running_server(app) as running:
        yield running.url


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
        ({"model": "tiny", "prompt": "x", "logprobs": 21}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": "tiny", "prompt": [5, 10**9]}, "prompt"),
        ({"model": "tiny", "prompt": "x", "n": 2, "best_of": 1}, "best_of"),
        ({"model": "tiny", "prompt": "x", "best_of": 2, "stream": True}, "best_of"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"model": "tiny", "prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
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
        if payload == "{not json":  # a byte offset is no parameter
            assert response.json()["error"]["param"] is None
    unknown = httpx.post(f"{server}/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_alias_routes_to_both_models_and_metrics_count_them(client, server):
    seen = {client.completions.create(model="ab", prompt="x", max_tokens=1).model for _ in range(24)}
    assert seen == {"tiny", "other"}
    text = httpx.get(f"{server}/metrics").text
    assert 'llmctl_requests_total{endpoint="text_completion",finish_reason="length",model="other"}' in text
    assert "llmctl_time_to_first_token_seconds_bucket" in text and 'llmctl_queue_depth{model="tiny"}' in text


def test_a_request_of_three_choices_counts_one_request_and_three_choices(client, server):
    def counted(name: str) -> float:
        prefix = f'{name}{{endpoint="text_completion",finish_reason="length",model="tiny"}} '
        lines = [line for line in httpx.get(f"{server}/metrics").text.splitlines() if line.startswith(prefix)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = counted("llmctl_requests_total"), counted("llmctl_choices_total")
    client.completions.create(model="tiny", prompt="x", max_tokens=2, n=3)
    after = counted("llmctl_requests_total"), counted("llmctl_choices_total")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)


def test_client_disconnect_frees_the_slot(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "other", "prompt": "x", "max_tokens": 100, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # read one event, then hang up
    wait_until(
        lambda: httpx.get(f"{server}/health").json()["models"]["other"]["active"] == 0,
        timeout=10,
        message="the disconnected request kept its slot",
    )


def test_more_choices_than_the_limit_in_one_request_is_429(client):
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny", prompt="x", max_tokens=1, n=9)


def paused_model(checkpoint) -> ServedModel:
    """A served model whose engine is not running yet: admitted requests stay in flight until it starts."""
    model, tokenizer = load_for_inference(checkpoint)
    return ServedModel("tiny", checkpoint, Engine(model, max_batch=2), tokenizer, "chat is not used here")


def test_concurrent_requests_over_the_limit_get_429_and_the_rest_finish(tiny_checkpoint):
    served = paused_model(tiny_checkpoint)
    app = create_app({"tiny": served}, max_concurrency=3)
    outcomes: list[tuple[int, list[str]]] = []
    lock = threading.Lock()

    def stream(url: str) -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            if response.status_code == 200:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            else:
                events = [response.read().decode()]
            with lock:
                outcomes.append((response.status_code, events))

    with running_server(app) as running:
        clients = [threading.Thread(target=stream, args=(running.url,)) for _ in range(6)]
        for client in clients:
            client.start()
        wait_until(lambda: len(outcomes) == 3, message="three requests should have been refused at once")
        assert [status for status, _ in outcomes] == [429, 429, 429]
        assert all(json.loads(events[0])["error"]["type"] == "rate_limit_error" for _, events in outcomes)
        assert app.state.llmctl.admission.in_flight == 3
        served.engine.start()
        for client in clients:
            client.join(60)
        admitted = [events for status, events in outcomes if status == 200]
        assert len(admitted) == 3 and all(events[-1] == "[DONE]" for events in admitted)
        wait_until(lambda: app.state.llmctl.admission.in_flight == 0, message="admission was not given back")


def test_a_client_that_hangs_up_before_its_first_token_gives_its_admission_back(tiny_checkpoint):
    served = paused_model(tiny_checkpoint)
    app = create_app({"tiny": served}, max_concurrency=1)
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream": True}
    try:
        with running_server(app) as running:
            with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=30) as response:
                assert response.status_code == 200  # admitted, waiting for the paused engine
            wait_until(
                lambda: app.state.llmctl.admission.in_flight == 0, message="the hang-up kept its admission"
            )
            served.engine.start()
            again = httpx.post(f"{running.url}/v1/completions", json={**body, "stream": False}, timeout=30)
            assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] >= 1
    finally:
        served.engine.stop()


def test_a_checkpoint_that_cannot_load_is_reported_at_start(llmctl, tmp_path):
    result = llmctl("serve", f"broken={tmp_path}", "--port", str(free_port()))
    assert result.returncode == 2 and "not a checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_shutdown_drains_in_flight_streams(tiny_checkpoint):
    app = create_app({"tiny": load_served_model("tiny", tiny_checkpoint, max_batch=2)})
    body = {
        "model": "tiny",
        "prompt": "x",
        "max_tokens": 100,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with running_server(app, timeout=60) as running:
        with httpx.stream("POST", f"{running.url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        running.server.should_exit = True  # what SIGTERM does
        running.thread.join(60)
        assert not running.thread.is_alive()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": "x", "temperature": 1e400}, "temperature"),
        ({"prompt": "x", "top_p": float("nan")}, "top_p"),
    ],
)
def test_sampling_fields_are_validated_at_the_edge(server, body, param):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(
        f"{server}/v1/completions", content=json.dumps({"model": "tiny", **body}), headers=headers
    )
    assert response.status_code == 400 and response.json()["error"]["param"].startswith(param)
    ok = httpx.post(
        f"{server}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, headers=headers
    )
    assert ok.status_code == 200


def test_a_temperature_near_zero_is_greedy(client):
    greedy = client.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=0)
    tiny = client.completions.create(model="tiny", prompt="The", max_tokens=8, temperature=1e-30)
    assert tiny.choices[0].text == greedy.choices[0].text


def test_a_failing_request_gets_an_error_and_its_batch_neighbours_finish(tiny_checkpoint, monkeypatch):
    from llmctl.infer import engine as engine_module

    real_sample_rows = engine_module.sample_rows

    def failing_for_top_k_7(logits, params, histories, generators):
        if any(row.top_k == 7 for row in params):
            raise RuntimeError("injected failure")
        return real_sample_rows(logits, params, histories, generators)

    monkeypatch.setattr(engine_module, "sample_rows", failing_for_top_k_7)
    app = create_app({"tiny": load_served_model("tiny", tiny_checkpoint, max_batch=4)})
    results: dict[str, list[str]] = {}

    def stream(name: str, url: str, extra: dict) -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 24, "stream": True, **extra}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            results[name] = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]

    with running_server(app) as running:
        threads = [
            threading.Thread(target=stream, args=(name, running.url, extra))
            for name, extra in (("good", {"temperature": 0}), ("bad", {"top_k": 7}), ("other", {"seed": 3}))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        failed = json.loads(results["bad"][-2])
        assert failed["error"]["type"] == "server_error" and "injected failure" in failed["error"]["message"]
        assert results["bad"][-1] == "[DONE]"
        for name in ("good", "other"):
            assert results[name][-1] == "[DONE]"
            assert json.loads(results[name][-2])["choices"][0]["finish_reason"] in ("length", "stop")
        whole = httpx.post(f"{running.url}/v1/completions", json={"model": "tiny", "prompt": "x", "top_k": 7})
        assert whole.status_code == 500 and whole.json()["error"]["code"] == "generation_failed"
        several = httpx.post(
            f"{running.url}/v1/completions", json={"model": "tiny", "prompt": "x", "top_k": 7, "n": 2}
        )
        assert several.status_code == 500
        assert httpx.get(f"{running.url}/health").status_code == 200
        metrics = httpx.get(f"{running.url}/metrics").text  # one stream, one whole, one with two choices
        assert 'llmctl_errors_total{model="tiny"} 3.0' in metrics


def test_the_api_docs_are_behind_the_key_and_the_key_is_checked_exactly(server):
    for path in ("/docs", "/openapi.json"):
        assert httpx.get(f"{server}{path}").status_code == 401
        assert httpx.get(f"{server}{path}", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    for wrong in (f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", API_KEY, ""):
        response = httpx.get(f"{server}/v1/models", headers={"Authorization": wrong})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_body_over_the_default_limit_with_its_length_gets_a_readable_413(server):
    """Issue 39, low: a 6 MiB body declaring its length was a connection reset while the client still sent."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": "tiny", "prompt": "x" * (6 << 20)}
    response = httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_oversized_bodies_and_prompts_are_refused_before_any_work(tiny_checkpoint):
    app = create_app(
        {"tiny": load_served_model("tiny", tiny_checkpoint, max_batch=1)}, max_body_bytes=100_000
    )
    with running_server(app) as running:
        big = httpx.post(f"{running.url}/v1/completions", json={"model": "tiny", "prompt": "x" * 200_000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunked():  # no Content-Length: the limit is counted as the body arrives
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(50):
                yield b"x" * 4096
            yield b'"}'

        streamed = httpx.post(
            f"{running.url}/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413 and "more than" in streamed.json()["error"]["message"]
        small = httpx.post(
            f"{running.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
        )
        assert small.status_code == 200
        long_prompt = {"model": "tiny", "prompt": "word " * 19_000}  # 95,000 characters, a 128-token context
        refused = httpx.post(f"{running.url}/v1/completions", json=long_prompt)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
        assert "95,000 characters" in refused.json()["error"]["message"]
        not_utf8 = httpx.post(
            f"{running.url}/v1/completions",
            content=b'{"model": "tiny", "prompt": "\xff\xfe"}',
            headers={"Content-Type": "application/json"},
        )
        assert not_utf8.status_code == 400 and set(not_utf8.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }


def test_an_empty_api_key_is_refused_at_start(llmctl, tiny_checkpoint):
    result = llmctl("serve", str(tiny_checkpoint), "--api-key", "", "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --api-key is empty (an unset variable?): pass a key, or leave the option out to serve without one"
    ]


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)  # the loop dies on purpose
def test_a_dead_engine_is_reported_and_restarted_by_the_watchdog(tiny_checkpoint):
    served = load_served_model("tiny", tiny_checkpoint, max_batch=2)
    app = create_app({"tiny": served})
    app.state.llmctl.watchdog_seconds = 0.05
    real_admit = served.engine._admit
    calls = {"n": 0}

    def admit_that_crashes_once() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the loop")  # outside any request: the loop thread dies
        real_admit()

    served.engine._admit = admit_that_crashes_once
    with running_server(app) as running:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 4}
        answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=30)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        health = httpx.get(f"{running.url}/health").json()
        assert health["status"] == "ok" and health["models"]["tiny"]["restarts"] == 1


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)  # the loop dies on purpose
def test_a_request_waiting_through_two_dead_loops_fails_so_a_fallback_can_serve_it(tiny_checkpoint):
    """A loop that died once may have died of something else: its waiting requests wait for the next loop.
    One that dies again with them still waiting fails them (they may be the cause), rather than leaving
    their clients hanging while the watchdog restarts it for ever."""
    served = load_served_model("tiny", tiny_checkpoint, max_batch=1)
    served.engine._admit = lambda: (_ for _ in ()).throw(RuntimeError("a bug in the loop"))
    finished: list[str | None] = []
    served.engine.submit(
        [1, 2], SamplingParams(max_new_tokens=1), lambda token, finish: finished.append(finish)
    )
    for expected in ([], ["error"]):
        wait_until(lambda: not served.engine.alive(), message="the loop should have died")
        assert served.engine.restart_if_dead() and finished == expected
    served.engine.stop()


@pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)  # the loop dies on purpose
async def test_health_is_503_while_an_engine_is_dead(tiny_checkpoint):
    served = load_served_model("tiny", tiny_checkpoint, max_batch=1)
    app = create_app({"tiny": served})  # in-process: no lifespan, so no watchdog repairs it behind our back
    served.engine._admit = lambda: (_ for _ in ()).throw(RuntimeError("a bug in the loop"))
    served.engine.submit([1, 2], SamplingParams(max_new_tokens=1), lambda token, finish: None)
    wait_until(lambda: not served.engine.alive(), message="the loop should have died")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://llmctl") as client:
        dead = await client.get("/health")
        assert dead.status_code == 503 and dead.json()["models"]["tiny"]["alive"] is False
        del served.engine._admit  # the bug is fixed; the watchdog's repair starts a new loop
        assert served.engine.restart_if_dead()
        alive = await client.get("/health")
        assert alive.status_code == 200 and alive.json()["models"]["tiny"]["restarts"] == 1
    served.engine.stop()
