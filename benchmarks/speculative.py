"""Speculative decoding in one run: batch-1 greedy tokens/s of a target checkpoint alone and with a draft
checkpoint (same tokenizer) at several lookaheads, with the acceptance rate measured on prompts cut from
held-out text, and a check that every speculative output equals the target's own. Then the serving engine
(`llmctl serve` with and without `--draft`): one request at a time and all prompts at once, eager or with
`--compile` (both models' steps compiled).

    .venv/bin/python -m benchmarks.speculative --target CKPT --draft SMALL_CKPT --prompts DATA [--compile]

The speed-up depends on how often the draft agrees with the target, so it needs trained checkpoints: a
target and a student distilled from it (`llmctl distill`) are the intended pair.
"""

from __future__ import annotations

import argparse
import threading
import time
from functools import partial
from pathlib import Path

from benchmarks.common import machine
from llmctl.evaluate.runner import read_texts
from llmctl.infer.decode import load_for_inference
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.speculative import SpeculationStats, speculative_generate_ids
from llmctl.runtime import in_passing_thread


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="held-out text (jsonl, txt or a corpus)")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--compile", action="store_true", help="the serving engine's steps compiled")
    args = parser.parse_args()
    # the main thread runs no torch work, so the serving engine's thread is the only one holding OpenMP workers
    # while it runs, as in `llmctl serve` (llmctl.runtime.in_passing_thread)
    target, draft, prompts, params, expected = in_passing_thread(lambda: chat_path(args))
    serving(target, draft, prompts, params, expected, args.compile)


def chat_path(args: argparse.Namespace):
    """The target alone and with the draft at several lookaheads, one prompt at a time, as `chat` decodes."""
    target, tokenizer = load_for_inference(args.target)
    draft, _ = load_for_inference(args.draft)
    prompts = []
    for text in read_texts(args.prompts):
        ids = tokenizer.encode(text)
        if len(ids) >= args.prompt_tokens:
            prompts.append(ids[: args.prompt_tokens])
        if len(prompts) == args.count:
            break
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)

    def timed(generate) -> tuple[float, list[list[int]]]:
        started = time.perf_counter()
        outputs = [list(generate(prompt)) for prompt in prompts]
        return sum(map(len, outputs)) / (time.perf_counter() - started), outputs

    timed(lambda prompt: generate_ids(target, prompt[:8], params))  # warm-up
    alone, expected = timed(lambda prompt: generate_ids(target, prompt, params))
    print(f"machine: {machine()}")
    print(
        f"target {args.target} ({target.config.num_parameters() / 1e6:.1f}M), draft {args.draft} "
        f"({draft.config.num_parameters() / 1e6:.1f}M); {len(prompts)} prompts of {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new, greedy"
    )
    print(f"{'':22}{'tokens/s':>10}{'speed-up':>10}{'accepted':>10}{'identical':>11}")
    print(f"{'target alone':22}{alone:>10.1f}{1.0:>9.2f}x{'-':>10}{'-':>11}")
    for lookahead in (2, 4, 6):
        stats = SpeculationStats()
        rate, outputs = timed(
            lambda prompt, k=lookahead, s=stats: speculative_generate_ids(target, draft, prompt, params, k, s)
        )
        same = sum(a == b for a, b in zip(outputs, expected, strict=True))
        print(
            f"{f'draft, lookahead {lookahead}':22}{rate:>10.1f}{rate / alone:>9.2f}x"
            f"{100 * stats.acceptance_rate:>9.0f}%{f'{same}/{len(prompts)}':>11}"
        )
    return target, draft, prompts, params, expected


def engine_outputs(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Every prompt submitted at once; each one's tokens when all have finished."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def collector(index: int):
        def collect(token: int | None, finish: str | None) -> None:
            if token is not None:
                outputs[index].append(token)
            if finish is not None:
                finished.release()

        return collect

    for index, prompt in enumerate(prompts):
        engine.submit(prompt, params, collector(index))
    for _ in prompts:
        finished.acquire()
    return outputs


def started_engine(target, batch: int, compile: bool, draft) -> Engine:
    return Engine(target, max_batch=batch, compile=compile, draft=draft).start()


def serving(target, draft, prompts, params, expected, compile: bool) -> None:
    """The serving engine with and without the draft: each prompt alone, then all of them as one batch."""
    print(f"\nserving engine ({'compiled' if compile else 'eager'} steps), lookahead 4:")
    print(f"{'':30}{'tokens/s':>10}{'speed-up':>10}{'accepted':>10}{'identical':>11}")
    for batch in (1, len(prompts)):
        rates = {}
        for name, engine_draft in (("alone", None), ("with the draft", draft)):
            engine = in_passing_thread(partial(started_engine, target, batch, compile, engine_draft))
            try:
                engine_outputs(engine, [prompt[:8] for prompt in prompts[:batch]], params)  # warm-up
                if engine.speculation is not None:
                    engine.speculation.stats = SpeculationStats()
                started = time.perf_counter()
                outputs = [
                    output
                    for first in range(0, len(prompts), batch)
                    for output in engine_outputs(engine, prompts[first : first + batch], params)
                ]
                rates[name] = sum(map(len, outputs)) / (time.perf_counter() - started)
            finally:
                engine.stop()
            same = sum(a == b for a, b in zip(outputs, expected, strict=True))
            accepted = f"{100 * engine.speculation.stats.acceptance_rate:.0f}%" if engine.speculation else "-"
            print(
                f"{f'batch {batch}, {name}':30}{rates[name]:>10.1f}{rates[name] / rates['alone']:>9.2f}x"
                f"{accepted:>10}{f'{same}/{len(prompts)}':>11}"
            )


if __name__ == "__main__":
    main()
