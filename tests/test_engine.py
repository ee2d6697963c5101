"""The continuous-batching engine: every request gets exactly what it would get alone."""

from __future__ import annotations

import pytest
from conftest import Collector, decisive_model

from llmctl.infer.decode import PromptTooLong
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams


@pytest.fixture(scope="module")
def model():
    return decisive_model()


def test_requests_joining_and_leaving_match_solo_generation(model):
    engine = Engine(model, max_batch=3).start()
    try:
        prompts = [[1, 2, 3], [5] * 9, [7, 8], [9, 10, 11, 12], [4], [20, 21, 22, 23, 24, 25]]
        budgets = [5, 12, 3, 9, 60, 7]  # 60 runs into the 48-token context
        jobs = []
        for prompt, budget in zip(prompts, budgets, strict=True):
            collector = Collector()
            engine.submit(prompt, SamplingParams(max_new_tokens=budget, temperature=0.0), collector)
            jobs.append((prompt, budget, collector))
        for prompt, budget, collector in jobs:
            assert collector.done.wait(30)
            expected = list(
                generate_ids(model, prompt, SamplingParams(max_new_tokens=budget, temperature=0.0))
            )
            assert collector.tokens == expected
            assert collector.finish == "length"
        assert len(jobs[4][2].tokens) == 48 - 1  # stopped by the context, not the budget
        assert engine.decode_steps < sum(budgets)  # steps were shared between requests
    finally:
        engine.stop()


def test_stop_id_and_cancellation_free_the_slot(model):
    engine = Engine(model, max_batch=1).start()
    try:
        free = list(generate_ids(model, [3, 4], SamplingParams(max_new_tokens=8, temperature=0.0)))
        stopper = Collector()
        engine.submit(
            [3, 4], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(free[2],)), stopper
        )
        assert stopper.done.wait(30) and stopper.finish == "stop" and stopper.tokens == free[:3]
        cancelled = Collector()
        request = engine.submit([3, 4], SamplingParams(max_new_tokens=10_000, temperature=0.0), cancelled)
        request.cancel()
        assert cancelled.done.wait(30) and cancelled.finish == "cancelled"
        after = Collector()
        engine.submit([3, 4], SamplingParams(max_new_tokens=4, temperature=0.0), after)
        assert after.done.wait(30) and after.tokens == free[:4]
    finally:
        engine.stop()


def test_prompt_length_is_checked_at_submit(model):
    engine = Engine(model, max_batch=1)  # not started: nothing is queued by a refused request
    with pytest.raises(PromptTooLong):
        engine.submit(list(range(60)), SamplingParams(), Collector())
    assert engine.queue_depth() == 0


def test_a_request_that_fails_fails_alone_and_the_engine_serves_on(model):
    engine = Engine(model, max_batch=3).start()
    try:
        solo = list(generate_ids(model, [5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0.0)))
        good, bad, after = Collector(), Collector(), Collector()
        engine.submit([5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0.0), good)
        engine.submit([1, 2], SamplingParams(max_new_tokens=6, seed=2**70), bad)  # torch refuses the seed
        assert bad.done.wait(30) and bad.finish == "error" and bad.tokens == []
        assert good.done.wait(30) and good.tokens == solo
        engine.submit([5, 6, 7], SamplingParams(max_new_tokens=6, temperature=0.0), after)
        assert after.done.wait(30) and after.tokens == solo
    finally:
        engine.stop()


def test_a_request_failing_mid_batch_leaves_the_others_exact(model, monkeypatch):
    from llmctl.infer import engine as engine_module

    real_sample_rows = engine_module.sample_rows
    calls_with_top_k_7 = []

    def failing_for_top_k_7(logits, params, histories, generators):
        if any(row.top_k == 7 for row in params):  # fails a few tokens in, mid-batch
            calls_with_top_k_7.append(len(params))
            if len(calls_with_top_k_7) > 3:
                raise RuntimeError("injected failure")
        return real_sample_rows(logits, params, histories, generators)

    monkeypatch.setattr(engine_module, "sample_rows", failing_for_top_k_7)
    prompts = [[1, 2, 3], [9, 8], [4, 4, 4, 4]]
    solos = [
        list(generate_ids(model, p, SamplingParams(max_new_tokens=10, temperature=0.0))) for p in prompts
    ]
    engine = Engine(model, max_batch=4).start()
    try:
        collectors = [Collector() for _ in prompts]
        failing = Collector()
        for prompt, collector in zip(prompts[:2], collectors, strict=False):
            engine.submit(prompt, SamplingParams(max_new_tokens=10, temperature=0.0), collector)
        engine.submit([1, 2], SamplingParams(max_new_tokens=10, temperature=0.0, top_k=7), failing)
        engine.submit(prompts[2], SamplingParams(max_new_tokens=10, temperature=0.0), collectors[2])
        assert failing.done.wait(30) and failing.finish == "error" and 0 < len(failing.tokens) < 10
        assert max(calls_with_top_k_7) > 1  # it failed inside a batch of several rows
        for collector, solo in zip(collectors, solos, strict=True):
            assert collector.done.wait(30) and collector.tokens == solo
    finally:
        engine.stop()


def test_seeded_sampled_requests_in_one_batch_get_what_they_get_alone(model):
    """Rows sampled together (grouped by settings, each from its own generator) equal each row alone."""
    settings = [
        SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=1),
        SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=2),  # same group as the first
        SamplingParams(max_new_tokens=12, temperature=1.3, top_k=20, seed=3),
        SamplingParams(max_new_tokens=12, temperature=0.8, repetition_penalty=1.5, seed=4),
        SamplingParams(max_new_tokens=12, temperature=0.0),
    ]
    prompts = [[1, 2, 3], [1, 2, 3], [7, 8], [5, 5, 5], [9]]
    engine = Engine(model, max_batch=len(prompts)).start()
    try:
        collectors = [Collector() for _ in prompts]
        for prompt, params, collector in zip(prompts, settings, collectors, strict=True):
            engine.submit(prompt, params, collector)
        for prompt, params, collector in zip(prompts, settings, collectors, strict=True):
            assert collector.done.wait(30)
            assert collector.tokens == list(generate_ids(model, prompt, params))
        assert collectors[0].tokens != collectors[1].tokens  # the seeds, not the batch, decide
    finally:
        engine.stop()


def test_requests_waiting_together_are_prefilled_in_one_forward(model, monkeypatch):
    """Prompts of different lengths, right-padded into one prefill, each get what they get alone."""
    from llmctl.infer import engine as engine_module

    groups = []
    real_prefill_rows = engine_module.prefill_rows

    def recording(model, prompts, cache, **kwargs):
        groups.append(len(prompts))
        return real_prefill_rows(model, prompts, cache, **kwargs)

    monkeypatch.setattr(engine_module, "prefill_rows", recording)
    prompts = [[1, 2, 3], [5] * 9, [7, 8], [9, 10, 11, 12], [4]]
    engine = Engine(model, max_batch=4)
    collectors = [Collector() for _ in prompts]
    for prompt, collector in zip(prompts, collectors, strict=True):
        engine.submit(prompt, SamplingParams(max_new_tokens=8, temperature=0.0), collector)
    engine.start()  # everything is waiting before the loop's first admission
    try:
        for prompt, collector in zip(prompts, collectors, strict=True):
            assert collector.done.wait(30)
            assert collector.tokens == list(
                generate_ids(model, prompt, SamplingParams(max_new_tokens=8, temperature=0.0))
            )
        assert groups[0] == 4 and sum(groups) == 5
    finally:
        engine.stop()
