"""The compiled decode step (torch.compile of the one slot-cache step, as gpt-fast does): greedy tokens equal
the eager path's, alone and in a continuous batch that requests join and leave mid-flight. It is built as chat
and serve build it by default: in a background thread while the engine serves eagerly, taking over between two
steps without compiling again in the engine's thread."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import Collector, decisive_model

from llmctl.infer.background_compile import compile_in_background
from llmctl.infer.cpu_decode import use_decode_kernels
from llmctl.infer.decode import compile_decode, warm_up_decode
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_batch, generate_ids
from llmctl.infer.sampling import SamplingParams

PROMPTS = [[1, 2, 3], [5] * 9, [7, 8], [9, 10, 11, 12], [4], [20, 21, 22, 23, 24, 25]]
BUDGETS = [5, 12, 3, 9, 60, 7]  # 60 runs into the 48-token context


def greedy(budget: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=budget, temperature=0.0)


def serve_all(engine: Engine, budget: int = 20) -> list[list[int]]:
    collectors = [Collector() for _ in PROMPTS]
    for prompt, collector in zip(PROMPTS, collectors, strict=True):
        engine.submit(prompt, greedy(budget), collector)
    for collector in collectors:
        assert collector.done.wait(120)
    return [collector.tokens for collector in collectors]


@pytest.fixture(scope="module")
def models():
    """(eager, compiled, engine): the same weights, both on the CPU decode kernels; the compiled one's step
    compiled in the background while its engine serves eagerly, as `llmctl serve` does by default: the engine
    answers with the eager step's tokens meanwhile, and once the compiled step has taken over, with the same
    tokens and no graph compiled in its thread."""
    eager = decisive_model()
    use_decode_kernels(eager)
    expected = [list(generate_ids(eager, prompt, greedy(20))) for prompt in PROMPTS]
    compiled = copy.deepcopy(eager)
    engine = Engine(compiled, max_batch=3).start()
    reports: list[str] = []
    try:
        thread = compile_in_background(compiled, 3, reports.append)
        assert (
            serve_all(engine) == expected
        )  # eager while the step compiles (or compiled, were it that quick)
        thread.join(600)
        assert not thread.is_alive() and "decode step compiled" in reports[-1], reports
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert serve_all(engine) == expected
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    finally:
        engine.stop()
    return eager, compiled, Engine(compiled, max_batch=3)


def test_compiled_greedy_generation_equals_eager(models):
    eager, compiled, _ = models
    for prompt, budget in zip(PROMPTS, BUDGETS, strict=True):
        expected = list(generate_ids(eager, prompt, greedy(budget)))
        assert list(generate_ids(compiled, prompt, greedy(budget))) == expected
        # and the eager slot-cache path equals the padded static batch's (the KVCache path)
        assert generate_batch(eager, [prompt], greedy(budget))[0] == expected


def test_a_compiled_continuous_batch_equals_each_request_alone(models):
    eager, _, engine = models
    engine.start()
    try:
        jobs = []
        for index, (prompt, budget) in enumerate(zip(PROMPTS, BUDGETS, strict=True)):
            collector = Collector()
            engine.submit(prompt, greedy(budget), collector)
            jobs.append((prompt, budget, collector))
            if index == 2:  # the rest join a running batch
                assert jobs[0][2].done.wait(60)
        for prompt, budget, collector in jobs:
            assert collector.done.wait(60)
            assert collector.tokens == list(generate_ids(eager, prompt, greedy(budget)))
        assert engine.decode_steps < sum(BUDGETS)  # steps were shared
    finally:
        engine.stop()


def test_chats_background_compile_serves_every_length_without_compiling_again(models):
    """`llmctl chat` warms its step up in the background on a scratch cache, then replies through
    `generate_ids`, whose cache is made under inference mode: one graph serves both, whatever the length."""
    eager, _, _ = models
    model = copy.deepcopy(eager)
    reports: list[str] = []
    compile_in_background(model, 1, reports.append).join(600)
    assert "decode step compiled" in reports[-1], reports
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    assert list(generate_ids(model, [1, 2, 3], greedy(4))) == list(generate_ids(eager, [1, 2, 3], greedy(4)))
    list(generate_ids(model, list(range(1, 20)), greedy(20)))
    assert len(list(generate_ids(model, [9], greedy(30)))) == 30
    assert counters["stats"]["unique_graphs"] == before


def test_a_compiled_speculative_batch_equals_each_request_alone_without_recompiling(models):
    """`serve --compile --draft`: the draft's step and the target's verifying step (several tokens per row,
    fewer near the context's end; 2 rows of 9 pass the kernel's 16 rows, 1 row does not) are compiled at
    start; nothing compiles while serving, in the engine's thread. Two rows keep the graphs to compile at
    eight (one row and two, for each width of each model); the draft has the target's shape, so that inductor
    compiles the graphs they share once (a cold compile takes ~10 s a graph on 2 cores)."""
    eager, _, _ = models
    target = copy.deepcopy(eager)
    draft = decisive_model(3)
    use_decode_kernels(draft)
    engine = Engine(target, max_batch=2, compile=True, draft=draft, lookahead=8)
    counters = torch._dynamo.utils.counters
    compiled_at_start = counters["stats"]["unique_graphs"]
    engine.start()
    try:
        jobs = []
        for prompt, budget in zip(PROMPTS, BUDGETS, strict=True):
            collector = Collector()
            engine.submit(prompt, greedy(budget), collector)
            jobs.append((prompt, budget, collector))
        for prompt, budget, collector in jobs:
            assert collector.done.wait(60)
            assert collector.tokens == list(generate_ids(eager, prompt, greedy(budget)))
    finally:
        engine.stop()
    assert engine.speculation.stats.target_passes < sum(BUDGETS)
    assert counters["stats"]["unique_graphs"] == compiled_at_start


def test_a_model_compiles_each_class_of_batch_past_dynamos_global_recompile_limit():
    """A served model has a graph for each class of batch (one row, two, widths of speculative decoding),
    more than dynamo's default limit of 8 with a draft: `compile_decode` gives the step its own limit, so
    the global one (here 1: two graphs pass it) does not fail the second graph's fullgraph compile."""
    model = decisive_model(1)
    use_decode_kernels(model)
    expected = generate_batch(model, [[1, 2, 3], [4, 5, 6]], greedy(3))
    compile_decode(model)
    with torch._dynamo.config.patch(recompile_limit=1):
        warm_up_decode(model, model.new_kv_cache(2, max_len=8, slots=True))
        assert [list(generate_ids(model, prompt, greedy(3))) for prompt in ([1, 2, 3], [4, 5, 6])] == expected


def test_compiled_models_with_one_cache_shape_keep_their_own_graphs_and_the_callers_dynamo_settings():
    """A model's graphs skip dynamo's guards on its modules and hold its norms' eps as constants, so they must
    never serve another model whose KV cache has the same shape (here a different SwiGLU width and eps); and the
    setting the step is traced under (floats as constants) is restored for the caller."""
    first, second = decisive_model(1), decisive_model(2, d_ff=128, norm_eps=0.5)
    expected = []
    for model in (first, second):
        use_decode_kernels(model)
        expected.append(list(generate_ids(model, [1, 2, 3], greedy(8))))
    assert expected[0] != expected[1]
    for model in (first, second):
        compile_decode(model)
    for _ in range(2):  # alternating, after both have compiled
        assert [list(generate_ids(model, [1, 2, 3], greedy(8))) for model in (first, second)] == expected
    assert torch._dynamo.config.specialize_float is False  # dynamo's default, untouched in this thread
