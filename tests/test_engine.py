"""The continuous-batching engine: every request gets exactly what it would get alone."""

from __future__ import annotations

import threading

import pytest
import torch

from llmctl.infer.decode import PromptTooLong
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(vocab_size=128, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=48)
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)
    return model


class Collector:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, token, finish) -> None:
        if token is not None:
            self.tokens.append(token)
        if finish is not None:
            self.finish = finish
            self.done.set()


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
