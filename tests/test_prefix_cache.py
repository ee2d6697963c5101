"""Reused prefixes: a prompt that begins like an admitted prompt or a finished request's sequence (a shared
system prompt, the earlier turns of a chat) starts from its cached keys and values, with exactly the tokens a full prefill
gives; the cache stays within its token budget."""

from __future__ import annotations

import threading

import pytest
from conftest import decisive_model

from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_ids
from llmctl.infer.prefix_cache import PrefixCache
from llmctl.infer.sampling import SamplingParams

GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)
SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]


@pytest.fixture(scope="module")
def model():
    return decisive_model(max_seq_len=96)


def run(engine: Engine, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    tokens, done = [], threading.Event()

    def collect(token, finish):
        if token is not None:
            tokens.append(token)
        if finish is not None:
            done.set()

    engine.submit(prompt, params, collect)
    assert done.wait(30)
    return tokens


def test_a_shared_system_prompt_and_earlier_turns_are_reused_with_identical_tokens(model):
    engine = Engine(model, max_batch=2, prefix_cache_tokens=512).start()
    try:
        first = SYSTEM + [30, 31, 32]
        reply = run(engine, first)
        assert reply == list(generate_ids(model, first, GREEDY))
        stats = engine.prefixes.stats
        assert stats.hits == 0
        # another user, the same system prompt: the shared part is reused
        second = SYSTEM + [40, 41]
        assert run(engine, second) == list(generate_ids(model, second, GREEDY))
        assert stats.hits == 1 and stats.reused_tokens == len(SYSTEM)
        # the next turn of the first conversation: its prompt, its reply and more
        turn = first + reply + [50, 51, 52]
        assert run(engine, turn) == list(generate_ids(model, turn, GREEDY))
        assert stats.hits == 2 and stats.reused_tokens == len(SYSTEM) + len(first) + len(reply) - 1
        # a seeded sampled request is the same with or without the reuse
        sampled = SamplingParams(max_new_tokens=10, temperature=0.9, seed=5)
        assert run(engine, SYSTEM + [60], sampled) == list(generate_ids(model, SYSTEM + [60], sampled))
        assert stats.hit_rate > 0.5
    finally:
        engine.stop()


def test_without_a_budget_nothing_is_kept_and_a_short_prefix_is_not_reused(model):
    engine = Engine(model, max_batch=2).start()
    try:
        assert engine.prefixes is None
        assert run(engine, SYSTEM + [1]) == list(generate_ids(model, SYSTEM + [1], GREEDY))
    finally:
        engine.stop()
    cache = PrefixCache(max_tokens=100, min_tokens=8)
    slots = model.new_kv_cache(1, slots=True)
    cache.store([1, 2, 3], slots, 0)  # shorter than min_tokens: not worth keeping
    assert not cache.entries


def test_the_cache_keeps_within_its_token_budget_least_recently_used_first(model):
    cache = PrefixCache(max_tokens=40, min_tokens=4)
    slots = model.new_kv_cache(1, slots=True)
    for start in range(6):
        cache.store(list(range(start * 20, start * 20 + 15)), slots, 0)
        assert cache.tokens <= 40
    assert len(cache.entries) == 2
    assert cache.lookup(list(range(100, 116)))[1] == 15  # the newest entries survive
    assert cache.lookup(list(range(0, 16)))[0] is None  # the oldest went first


def test_the_hit_rate_is_in_the_servers_metrics(model):
    pytest.importorskip("prometheus_client")
    from pathlib import Path

    from llmctl.infer.served import ServedModel
    from llmctl.infer.server_metrics import ServerMetrics

    engine = Engine(model, max_batch=2, prefix_cache_tokens=512).start()
    try:
        run(engine, SYSTEM + [1])
        run(engine, SYSTEM + [2])
        served = ServedModel(name="m", path=Path("."), engine=engine, tokenizer=None, chat="not used")
        text = ServerMetrics({"m": served}).render()
    finally:
        engine.stop()
    assert 'llmctl_prefix_cache{measure="hits",model="m"} 1.0' in text
    assert 'llmctl_prefix_cache{measure="hit_rate",model="m"} 0.5' in text


def test_one_conversation_reuses_its_earlier_turns_in_generate_ids(model):
    """`llmctl chat`'s path: each turn prefills only what the last one did not see."""
    prefixes = PrefixCache(max_tokens=96)
    first = SYSTEM + [30, 31]
    reply = list(generate_ids(model, first, GREEDY, prefixes))
    assert reply == list(generate_ids(model, first, GREEDY))
    turn = first + reply + [50, 51]
    assert list(generate_ids(model, turn, GREEDY, prefixes)) == list(generate_ids(model, turn, GREEDY))
    assert prefixes.stats.hits == 1 and prefixes.stats.reused_tokens == len(first) + len(reply) - 1
    stream = generate_ids(model, SYSTEM + [70], GREEDY, prefixes)
    next(stream)
    stream.close()  # a caller that stops early still leaves a valid entry
    assert list(generate_ids(model, SYSTEM + [70, 71], GREEDY, prefixes)) == list(
        generate_ids(model, SYSTEM + [70, 71], GREEDY)
    )


def test_a_request_arriving_while_another_decodes_reuses_that_ones_prompt(model):
    """The prompt is stored at admission: a request sharing the system prompt need not wait for the first
    to finish. The second is submitted from the first's first token, so the first is still decoding."""
    engine = Engine(model, max_batch=2, prefix_cache_tokens=512).start()
    first, second = SYSTEM + [30, 31], SYSTEM + [40, 41, 42]
    long = SamplingParams(max_new_tokens=60, temperature=0.0)
    tokens: dict[str, list[int]] = {"first": [], "second": []}
    finished = {"first": threading.Event(), "second": threading.Event()}
    order: list[str] = []

    def collector(name: str):
        def collect(token, finish):
            if token is not None:
                tokens[name].append(token)
                if name == "first" and len(tokens[name]) == 1:
                    engine.submit(second, GREEDY, collector("second"))
            if finish is not None:
                order.append(name)
                finished[name].set()

        return collect

    try:
        engine.submit(first, long, collector("first"))
        assert finished["first"].wait(30) and finished["second"].wait(30)
        stats = engine.prefixes.stats
    finally:
        engine.stop()
    assert order == ["second", "first"]  # the first was still decoding when the second came and went
    assert stats.hits == 1 and stats.reused_tokens == len(SYSTEM)
    assert tokens["second"] == list(generate_ids(model, second, GREEDY))
    assert tokens["first"] == list(generate_ids(model, first, long))
    assert [len(entry) for entry in engine.prefixes.entries] == [len(second) + 9, len(first) + 59]
