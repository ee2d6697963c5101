"""Where the serving loaders do their torch work: in a thread that ends, so that the engine's thread is the only
one left holding OpenMP workers (llmctl.runtime.in_passing_thread)."""

from __future__ import annotations

import threading

import pytest

from llmctl import runtime
from llmctl.errors import UserError


def test_a_passing_thread_returns_the_result_and_raises_the_error_here_and_is_gone():
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert runtime.in_passing_thread(work) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise UserError("checkpoint not found")

    with pytest.raises(UserError, match="checkpoint not found"):
        runtime.in_passing_thread(fail)


@pytest.mark.parametrize("adapters", [False, True])
def test_served_models_are_loaded_and_warmed_up_off_the_calling_thread(
    tiny_checkpoint, monkeypatch, adapters
):
    from llmctl.infer import engine as engine_module
    from llmctl.infer import served

    built_in: list[threading.Thread] = []
    real_engine = engine_module.Engine

    def recording_engine(*args, **kwargs):
        built_in.append(threading.current_thread())
        return real_engine(*args, **kwargs)

    monkeypatch.setattr(served, "Engine", recording_engine)
    loaded = (
        served.load_served_adapters("base", tiny_checkpoint, {}, max_batch=2)
        if adapters
        else {"base": served.load_served_model("base", tiny_checkpoint, max_batch=2)}
    )
    try:
        assert built_in and built_in[0] is not threading.current_thread()
        assert not built_in[0].is_alive()  # the loader's thread ended, taking its OpenMP workers with it
        assert loaded["base"].engine.alive()  # the engine's own thread serves on
    finally:
        loaded["base"].engine.stop()
