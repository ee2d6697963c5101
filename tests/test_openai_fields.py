"""The OpenAI request fields past sampling: log-probabilities (generated and echoed prompt), several
prompts, token-id prompts, best_of, logit_bias, seeds across restarts, and vLLM's tokenizer endpoints, which
together let lm-evaluation-harness's `local-completions` score a served model as it scores one in process."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from conftest import running_server

from llmctl.infer.decode import load_for_inference
from llmctl.infer.served import load_served_model
from llmctl.infer.server import create_app

API_KEY = "sk-fields"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    models = {"tiny": load_served_model("tiny", tiny_checkpoint, max_batch=4, prefix_cache_tokens=1024)}
    with running_server(create_app(models, api_key=API_KEY)) as running:
        yield running.url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint):
    """The model's own log-probabilities of each token of a sequence given those before it."""
    model, tokenizer = load_for_inference(tiny_checkpoint)

    @torch.inference_mode()
    def score(ids: list[int]) -> torch.Tensor:
        log_probs = torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)
        return log_probs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]

    score.tokenizer, score.model = tokenizer, model
    return score


def test_echo_with_max_tokens_0_scores_every_prompt_token(client, scorer):
    ids = scorer.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    result = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    choice = choice_of(result)
    logprobs = choice.logprobs
    assert result.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert choice.text == scorer.tokenizer.decode(ids)
    assert len(logprobs.token_logprobs) == len(ids) and logprobs.token_logprobs[0] is None
    expected = scorer(ids).tolist()
    assert max(abs(a - b) for a, b in zip(logprobs.token_logprobs[1:], expected, strict=True)) < 1e-4
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(ids))]
    for token_logprob, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert len(top) == 1 and max(top.values()) >= token_logprob - 1e-6


def choice_of(result):
    assert len(result.choices) == 1
    return result.choices[0]


def test_generated_tokens_carry_the_models_log_probabilities(client, scorer):
    prompt = scorer.tokenizer.encode("Once upon a time")
    result = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True
    )
    logprobs = choice_of(result).logprobs
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    tail = choice_of(whole).logprobs
    assert len(tail.token_logprobs) == 6 and len(logprobs.token_logprobs) == len(prompt) + 6
    assert logprobs.token_logprobs[len(prompt) :] == tail.token_logprobs
    for value, top in zip(tail.token_logprobs, tail.top_logprobs, strict=True):
        assert len(top) == 3 and math.isclose(max(top.values()), value)  # greedy: the likeliest each time
    assert sum(math.exp(v) for v in tail.top_logprobs[0].values()) <= 1.0 + 1e-6


def test_chat_logprobs_streamed_and_not(client):
    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    content = choice_of(whole).logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.bytes == list(entry.token.encode())
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)  # greedy
    streamed = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    pieces = [
        entry
        for chunk in streamed
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    # the second request reuses the first's prompt from the prefix cache, so its last prompt token is computed
    # alone instead of inside the whole prompt's forward: the same tokens, log-probabilities to the last bits
    assert [e.token for e in pieces] == [e.token for e in content]
    for streamed_entry, entry in zip(pieces, content, strict=True):
        assert math.isclose(streamed_entry.logprob, entry.logprob, rel_tol=1e-5)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, temperature=0)
    assert choice_of(plain).logprobs is None


def test_several_prompts_as_texts_and_as_ids(client, scorer):
    texts = ["The first", "A second prompt"]
    result = client.completions.create(
        model="tiny", prompt=texts, max_tokens=3, n=2, temperature=0, echo=True
    )
    assert [choice.index for choice in result.choices] == [0, 1, 2, 3]
    assert [choice.text[: len(texts[i // 2])] for i, choice in enumerate(result.choices)] == [
        texts[0],
        texts[0],
        texts[1],
        texts[1],
    ]
    ids = [scorer.tokenizer.encode(text) for text in texts]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=3, n=2, temperature=0)
    assert result.usage.prompt_tokens == by_ids.usage.prompt_tokens == sum(map(len, ids))
    assert [c.text for c in by_ids.choices] == [
        c.text[len(texts[i // 2]) :] for i, c in enumerate(result.choices)
    ]


def test_best_of_returns_the_candidate_with_the_highest_mean_log_probability(client):
    asked = {"model": "tiny", "prompt": "In the beginning", "max_tokens": 8, "temperature": 1.0, "seed": 5}
    candidates = client.completions.create(**asked, n=4, logprobs=0)
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in candidates.choices]
    best = client.completions.create(**asked, n=1, extra_body={"best_of": 4})
    assert choice_of(best).text == candidates.choices[means.index(max(means))].text
    assert best.usage.completion_tokens == candidates.usage.completion_tokens  # all four were generated
    assert choice_of(best).logprobs is None  # best_of's own ranking is not shown unless asked
    assert len({c.text for c in candidates.choices}) > 1


def test_logit_bias_moves_the_choice(client, scorer):
    asked = {"model": "tiny", "prompt": "Some text", "max_tokens": 4, "temperature": 0, "logprobs": 0}
    free = choice_of(client.completions.create(**asked)).logprobs
    with torch.inference_mode():
        first = int(scorer.model(torch.tensor([scorer.tokenizer.encode("Some text")]))[0, -1].argmax())
    forced_id = 7
    forced = client.completions.create(**asked, logit_bias={str(forced_id): 100})
    text = scorer.tokenizer.decode([forced_id] * 4)
    assert choice_of(forced).text == text
    banned = client.completions.create(**asked, logit_bias={str(first): -100})
    assert choice_of(banned).logprobs.token_logprobs[0] < free.token_logprobs[0]  # not the likeliest now


def test_a_seed_gives_the_same_tokens_after_a_restart(tiny_checkpoint):
    body = {"model": "tiny", "prompt": "Seeded", "max_tokens": 12, "temperature": 1.0, "seed": 1234, "n": 2}
    texts = []
    for _ in range(2):
        models = {"tiny": load_served_model("tiny", tiny_checkpoint, max_batch=4)}
        with running_server(create_app(models)) as running:
            noise = {**body, "seed": 99, "prompt": "Other rows in the batch"}
            with httpx.Client(timeout=60) as http:
                http.post(f"{running.url}/v1/completions", json=noise)
                result = http.post(f"{running.url}/v1/completions", json=body).json()
        texts.append([choice["text"] for choice in result["choices"]])
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]


def test_tokenizer_endpoints(server, scorer):
    text = "Tokenize me, please."
    tokens = httpx.post(
        f"{server}/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=HEADERS
    )
    assert tokens.json()["tokens"] == scorer.tokenizer.encode(text)
    with_bos = httpx.post(f"{server}/tokenize", json={"prompt": text}, headers=HEADERS).json()["tokens"]
    assert with_bos == [scorer.tokenizer.bos_id, *scorer.tokenizer.encode(text)]
    back = httpx.post(f"{server}/detokenize", json={"tokens": tokens.json()["tokens"]}, headers=HEADERS)
    assert back.json()["prompt"] == text
    info = httpx.get(f"{server}/tokenizer_info", headers=HEADERS).json()
    assert info["eos_token"] == scorer.tokenizer.token_text(scorer.tokenizer.eos_id)
    assert httpx.post(f"{server}/tokenize", json={"prompt": text}).status_code == 401
    outside = httpx.post(f"{server}/detokenize", json={"tokens": [10**9]}, headers=HEADERS)
    assert outside.status_code == 400 and "vocabulary" in outside.json()["error"]["message"]


def test_lm_eval_local_completions_scores_as_the_in_process_adapter(
    server, tiny_checkpoint, sample_pipeline, tmp_path, monkeypatch
):
    """lm-eval pointed at the server (its remote tokenizer found through /tokenizer_info and /tokenize, prompt
    token ids scored by echo) gives the in-process adapter's per-choice log-likelihoods and accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import llmctl.evaluate.lm_eval_adapter  # noqa: F401  (registers the model type)
    from llmctl.evaluate.suite import build_domain_suite

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends the completions with
    suite = build_domain_suite(sample_pipeline["corpus"], tmp_path / "domain")
    manager = TaskManager(include_path=str(suite.parent), include_defaults=False)
    remote = (
        f"model=tiny,base_url={server}/v1/completions,auth_token={API_KEY},num_concurrent=1,"
        "max_retries=1,max_length=256"
    )
    runs = {
        name: lm_eval.simple_evaluate(
            model=name,
            model_args=args,
            tasks=["domain_cloze"],
            task_manager=manager,
            limit=12,
            log_samples=True,
        )
        for name, args in (
            ("local-completions", remote),
            ("llmctl", f"pretrained={tiny_checkpoint},add_bos_token=False"),
        )
    }
    scores = {
        name: [[float(r[0]) for r in s["filtered_resps"]] for s in run["samples"]["domain_cloze"]]
        for name, run in runs.items()
    }
    served, local = scores["local-completions"], scores["llmctl"]
    assert len(served) == 12 and all(len(row) == 4 for row in served)
    assert (
        max(abs(a - b) for x, y in zip(served, local, strict=True) for a, b in zip(x, y, strict=True)) < 1e-4
    )
    accuracy = {name: run["results"]["domain_cloze"]["acc,none"] for name, run in runs.items()}
    assert accuracy["local-completions"] == accuracy["llmctl"]


@pytest.mark.parametrize(
    ("endpoint", "field", "value"),
    [
        ("completions", "suffix", "tail"),
        ("chat/completions", "functions", [{"name": "f", "parameters": {}}]),
        ("chat/completions", "function_call", "auto"),
        ("chat/completions", "audio", {"voice": "alloy", "format": "wav"}),
        ("chat/completions", "modalities", ["text", "audio"]),
        ("chat/completions", "prediction", {"type": "content", "content": "x"}),
        ("chat/completions", "web_search_options", {}),
        ("completions", "n", 2),  # with 40 prompts: 80 generations, more than one request may ask
    ],
)
def test_a_field_that_would_change_the_output_and_is_not_supported_is_a_400(server, endpoint, field, value):
    body = {"model": "tiny", "max_tokens": 2, field: value}
    if endpoint == "completions":
        body["prompt"] = ["x"] * 40 if field == "n" else "x"
    else:
        body["messages"] = [{"role": "user", "content": "x"}]
    response = httpx.post(f"{server}/v1/{endpoint}", json=body, headers=HEADERS)
    assert response.status_code == 400 and response.json()["error"]["param"] == field, response.text


def test_fields_that_only_describe_the_request_are_accepted(client):
    result = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_completion_tokens=3,
        store=False,
        metadata={"team": "docs"},
        modalities=["text"],
    )
    assert result.choices[0].finish_reason in ("stop", "length")
