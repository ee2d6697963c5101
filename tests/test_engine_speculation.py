"""Speculative decoding inside the serving engine (`serve --draft`): every request gets the target's tokens
(greedy) or the target's distribution (sampled), however the rows of a batch accept, join and leave."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import Collector, decisive_model

from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def target():
    return decisive_model(max_seq_len=64)


def run_all(engine: Engine, jobs: list[tuple[list[int], SamplingParams]]) -> list[Collector]:
    collectors = []
    for prompt, params in jobs:
        collectors.append(Collector())
        engine.submit(prompt, params, collectors[-1])
    for collector in collectors:
        assert collector.done.wait(60)
    return collectors


@pytest.mark.parametrize("lookahead", [1, 4])
def test_greedy_rows_joining_and_leaving_get_the_targets_own_tokens(target, lookahead):
    poor = decisive_model(7, d_model=32, n_layer=1, max_seq_len=64)
    for draft in (poor, target):
        engine = Engine(
            target, max_batch=3, draft=draft, lookahead=lookahead, prefix_cache_tokens=256
        ).start()
        try:
            free = list(generate_ids(target, [3, 4], SamplingParams(max_new_tokens=12, temperature=0.0)))
            jobs = [
                ([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0.0)),
                ([5] * 9, SamplingParams(max_new_tokens=17, temperature=0.0, repetition_penalty=1.3)),
                ([7, 8], SamplingParams(max_new_tokens=3, temperature=0.0)),
                ([9, 10, 11, 12], SamplingParams(max_new_tokens=100, temperature=0.0)),  # meets the context
                ([3, 4], SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(free[6],))),
                ([1, 2, 3, 40, 41], SamplingParams(max_new_tokens=9, temperature=0.0)),  # reuses a prefix
                ([20, 21, 22, 23, 24, 25], SamplingParams(max_new_tokens=1, temperature=0.0)),
            ]
            collectors = run_all(engine, jobs)
            for (prompt, params), collector in zip(jobs, collectors, strict=True):
                assert collector.tokens == list(generate_ids(target, prompt, params)), (
                    prompt,
                    draft is target,
                )
            assert collectors[3].finish == "length" and len(collectors[3].tokens) == 64 - 4
            assert collectors[4].finish == "stop" and collectors[4].tokens == free[: free.index(free[6]) + 1]
            stats = engine.speculation.stats
            assert 0 < stats.proposed <= lookahead * 3 * stats.target_passes  # at most 3 rows a pass
            if lookahead > 1:
                assert stats.proposed > stats.target_passes
            if draft is target:  # every proposal kept: fewer target passes than tokens
                assert stats.acceptance_rate == 1.0
                assert stats.target_passes < sum(len(c.tokens) for c in collectors) - len(jobs)
        finally:
            engine.stop()


def test_sampled_rows_follow_the_targets_distribution():
    """Many seeded requests in shared batches: the joint distribution of their first two tokens (the second
    comes from a speculative round) is the target's, computed exactly. The two models disagree enough (total
    variation ~0.5) that a wrong rule moves some probability by far more than the tolerance."""
    vocab = 6
    target = decisive_model(0, vocab_size=vocab, max_seq_len=16)
    draft = decisive_model(5, vocab_size=vocab, d_model=32, n_layer=1, max_seq_len=16)
    prompt = [1, 2, 3]
    with torch.inference_mode():
        first = target(torch.tensor([prompt]))[0, -1].softmax(-1)
        following = target(torch.tensor([[*prompt, t] for t in range(vocab)]))[:, -1].softmax(-1)
    expected = first[:, None] * following  # (first token, second token)
    engine = Engine(target, max_batch=16, draft=draft, lookahead=2).start()
    runs = 3000
    try:
        jobs = [
            (prompt, SamplingParams(max_new_tokens=2, temperature=1.0, seed=seed)) for seed in range(runs)
        ]
        collectors = run_all(engine, jobs)
    finally:
        engine.stop()
    counts = torch.zeros(vocab, vocab)
    for collector in collectors:
        counts[collector.tokens[0], collector.tokens[1]] += 1
    assert 0.05 < engine.speculation.stats.acceptance_rate < 0.95
    assert (counts / runs - expected).abs().max() < 0.03, (counts / runs, expected)


def test_a_seeded_request_is_the_same_alone_or_in_a_batch():
    target = decisive_model(0, max_seq_len=64)
    draft = decisive_model(3, d_model=32, n_layer=1, max_seq_len=64)
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, seed=11)
    engine = Engine(target, max_batch=4, draft=draft).start()
    try:
        (alone,) = run_all(engine, [([5, 6, 7], params)])
        others = [([i, i + 1], SamplingParams(max_new_tokens=15, temperature=1.0, seed=i)) for i in range(3)]
        batched = run_all(engine, [*others, ([5, 6, 7], params)])[-1]
    finally:
        engine.stop()
    assert batched.tokens == alone.tokens and len(alone.tokens) == 20


def test_a_draft_with_a_shorter_context_bounds_the_engines():
    target = decisive_model(0, max_seq_len=64)
    draft = decisive_model(3, d_model=32, n_layer=1, max_seq_len=32)
    engine = Engine(target, max_batch=2, draft=draft).start()
    try:
        assert engine.context == 32
        (collector,) = run_all(engine, [([1, 2], SamplingParams(max_new_tokens=100, temperature=0.0))])
    finally:
        engine.stop()
    assert collector.finish == "length" and len(collector.tokens) == 32 - 2
    assert collector.tokens == list(
        generate_ids(target, [1, 2], SamplingParams(max_new_tokens=30, temperature=0.0))
    )


def test_a_draft_of_another_vocabulary_is_refused():
    target = decisive_model(0)
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(target, draft=decisive_model(1, vocab_size=50))


@pytest.fixture(scope="module")
def decisive_checkpoints(sample_pipeline, tmp_path_factory):
    """A target and a smaller draft with the sample tokenizer, saved as checkpoints."""
    from llmctl.checkpoint import save_checkpoint
    from llmctl.data.tokenizer import open_tokenizer
    from llmctl.model.hf_format import export_state_dict

    tokenizer = open_tokenizer(sample_pipeline["tokenizer"])
    folder = tmp_path_factory.mktemp("speculation")
    saved = {}
    for name, model in (
        ("target", decisive_model(0, vocab_size=1024, max_seq_len=128)),
        ("draft", decisive_model(3, vocab_size=1024, d_model=32, n_layer=1, max_seq_len=128)),
    ):
        saved[name] = save_checkpoint(
            folder / name, model.config, export_state_dict(model), tokenizer=tokenizer
        )
    return saved


def test_the_server_with_a_draft_answers_as_without_and_reports_acceptance(decisive_checkpoints):
    httpx = pytest.importorskip("httpx")
    from conftest import running_server

    from llmctl.infer.served import load_served_model
    from llmctl.infer.server import create_app

    target, draft = decisive_checkpoints["target"], decisive_checkpoints["draft"]
    models = {
        "plain": load_served_model("plain", target, max_batch=4),
        "drafted": load_served_model("drafted", target, max_batch=4, draft=draft),
    }
    prompts = ["The Python tutorial", "Lists and tuples", "A", "Errors and exceptions are"]
    with (
        running_server(create_app(models)) as running,
        httpx.Client(base_url=running.url, timeout=60) as client,
    ):

        def complete(model: str, prompt: str, stream: bool = False) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": stream}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            if not stream:
                return response.json()["choices"][0]["text"]
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: {")]
            return "".join(json.loads(event)["choices"][0]["text"] for event in events)

        for prompt in prompts:
            expected = complete("plain", prompt)
            assert complete("drafted", prompt) == expected
            assert complete("drafted", prompt, stream=True) == expected
        metrics = client.get("/metrics").text
    for served in models.values():
        served.engine.stop()
    assert 'llmctl_speculation{measure="proposed",model="drafted"}' in metrics
    assert 'llmctl_speculation{measure="acceptance_rate",model="drafted"}' in metrics
    assert 'llmctl_time_seconds{model="drafted",phase="draft"}' in metrics
    assert 'model="plain"' not in "".join(line for line in metrics.splitlines() if "speculation" in line)


def test_serve_draft_takes_one_model_and_a_positive_lookahead(llmctl_in_process, decisive_checkpoints):
    target = str(decisive_checkpoints["target"])
    result = llmctl_in_process("serve", target, "--draft", target, "--lookahead", "0")
    assert result.returncode == 2 and "--lookahead" in result.stderr and "Traceback" not in result.stderr
    result = llmctl_in_process("serve", f"a={target}", f"b={target}", "--draft", target)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --draft serves one checkpoint without adapters: give exactly one model (merge an adapter first "
        "with llmctl finetune merge)"
    ]


def test_log_probabilities_are_the_targets_with_a_draft_or_without(target):
    """Each generated token's reported log-probability is the target's, however many a round accepted; a
    prompt's are scored in full even where a cached prefix could have been reused."""
    draft = decisive_model(7, d_model=32, n_layer=1, max_seq_len=64)
    params = SamplingParams(max_new_tokens=10, temperature=0.0, logprobs=2, prompt_logprobs=1)
    reports = []
    for engine in (
        Engine(target, max_batch=2, prefix_cache_tokens=256),
        Engine(target, max_batch=2, draft=draft),
    ):
        engine.start()
        try:
            run_all(engine, [([1, 2, 3, 4, 5], SamplingParams(max_new_tokens=3))])  # leaves a prefix cached
            collector = Collector()
            request = engine.submit([1, 2, 3, 4, 5, 6], params, collector)
            assert collector.done.wait(60)
            reports.append(request)
        finally:
            engine.stop()
    plain, speculative = reports
    assert [entry.token for entry in plain.logprobs] == plain.generated == speculative.generated
    for ours, theirs in zip(plain.logprobs, speculative.logprobs, strict=True):
        assert abs(ours.logprob - theirs.logprob) < 1e-4 and len(ours.top) == 2
        assert ours.top[0][0] == ours.token  # greedy: the likeliest
    with torch.inference_mode():
        scored = torch.log_softmax(target(torch.tensor([[1, 2, 3, 4, 5, 6]]))[0].float(), -1)
    expected = [float(scored[i, token]) for i, token in enumerate([2, 3, 4, 5, 6])]
    assert plain.prompt_logprobs[0] is None and len(plain.prompt_logprobs) == 6
    assert max(abs(e.logprob - x) for e, x in zip(plain.prompt_logprobs[1:], expected, strict=True)) < 1e-4
