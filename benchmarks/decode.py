"""Decode speed in one run, on identical weights: llmctl (eager, with the compiled decode step, and with the
fused step that chat and serve run by default), Hugging Face transformers `generate` and llama.cpp on F32 and
Q8_0 GGUF exports, greedy, batch 1 and batch 8, the same 16-token prompt for all, against this machine's
memory-bandwidth bound measured in the same run (every weight used is read once per decode step).

    .venv/bin/python -m benchmarks.decode [--shapes tiny,134m,smollm2] [--new-tokens 128] [--batch 8]

llama.cpp needs `pip install 'llmctl[llama]'` (llama-cpp-python, built from source); its row says so when it
is missing. Batch 8 runs through the serving engine (eight requests at once).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import machine, memory_bandwidth, sample_tokenizer
from llmctl.compress.gguf_export import write_gguf
from llmctl.compress.measure import DECODE_PROMPT
from llmctl.compress.run import llama_cpp_decode_speed
from llmctl.infer.cpu_decode import use_decode_kernels
from llmctl.infer.engine import Engine
from llmctl.infer.fused_step import use_fused_step
from llmctl.infer.generate import generate_batch, generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict, write_model_files
from llmctl.runtime import in_passing_thread, keep_freed_memory

SHAPES = {
    "tiny": ModelConfig(vocab_size=8000, d_model=384, n_layer=6, n_head=6, max_seq_len=1024),  # 16.8M
    "134m": ModelConfig(vocab_size=32000, d_model=768, n_layer=12, n_head=12, max_seq_len=1024),  # 134M
    # a real open model's shape: SmolLM2-135M (30 layers, 9 heads over 3 KV heads, 49k vocabulary, tied)
    "smollm2": ModelConfig(
        vocab_size=49152,
        d_model=576,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        d_ff=1536,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
}


def rate(fn: Callable[[], object], tokens: int, repeats: int = 2) -> float:
    """Tokens per second of the best of `repeats` runs after a warm-up, in a passing thread: this benchmark's
    main thread never runs parallel torch work, so the serving engine's thread is the only one holding OpenMP
    workers while it runs, as in `llmctl serve` (llmctl.runtime.in_passing_thread)."""

    def best() -> float:
        fn()  # warm-up
        seconds = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            seconds = min(seconds, time.perf_counter() - started)
        return tokens / seconds

    return in_passing_thread(best)


def engine_generate(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> None:
    """All prompts submitted at once to a running engine; returns when every one has finished."""
    remaining = threading.Semaphore(0)
    for prompt in prompts:
        engine.submit(prompt, params, lambda token, finish: finish is not None and remaining.release())
    for _ in prompts:
        remaining.acquire()


def alone_and_served(
    model: Transformer, engine: Engine, prompt: list[int], greedy: SamplingParams, args: argparse.Namespace
) -> tuple[float, float]:
    """Tokens/s of one prompt through `generate_ids` (chat's path), then of `args.batch` at once through the
    running `engine` (serve's), which is stopped after."""
    try:
        return (
            rate(lambda: list(generate_ids(model, prompt, greedy)), args.new_tokens),
            rate(
                lambda: engine_generate(engine, [prompt] * args.batch, greedy), args.new_tokens * args.batch
            ),
        )
    finally:
        engine.stop()


def weight_bytes_per_step(config: ModelConfig) -> int:
    """fp32 bytes a decode step must read: every matmul weight (the embedding table gives one row)."""
    untied_embedding = 0 if config.tie_embeddings else config.vocab_size * config.d_model
    return 4 * (config.num_parameters() - untied_embedding)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="tiny,134m,smollm2")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    keep_freed_memory()
    work = Path(tempfile.mkdtemp())
    tokenizer = sample_tokenizer(work)
    bandwidth = in_passing_thread(memory_bandwidth)
    print(f"machine: {machine()}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name in args.shapes.split(","):
        measure(name, SHAPES[name], args, bandwidth, work, tokenizer.path)


def measure(
    name: str, config: ModelConfig, args: argparse.Namespace, bandwidth: float, work: Path, tokenizer: Path
) -> None:
    import transformers

    prompt = DECODE_PROMPT  # llama.cpp's too (llmctl.compress.llama_cpp_timing)
    prompts = [prompt] * args.batch
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)

    def models() -> tuple[Transformer, torch.nn.Module]:
        torch.manual_seed(0)
        ours = Transformer(config).eval()
        state = export_state_dict(ours)
        (work / name).mkdir()
        write_model_files(work / name, config, state)
        for file_type in ("f32", "q8_0"):
            write_gguf(work / f"{name}.{file_type}.gguf", config, state, tokenizer, file_type, name)
        return ours, transformers.AutoModelForCausalLM.from_pretrained(
            work / name, dtype=torch.float32
        ).eval()

    ours, theirs = in_passing_thread(models)
    hf_kwargs = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
    )

    def hf(batch_size: int) -> None:
        ids = torch.tensor([prompt] * batch_size)
        with torch.inference_mode():
            theirs.generate(ids, attention_mask=torch.ones_like(ids), **hf_kwargs)

    batch_tokens = args.new_tokens * args.batch
    rows: dict[str, tuple[float, float | None]] = {}
    torch_1 = rate(lambda: list(generate_ids(ours, prompt, greedy)), args.new_tokens)
    torch_b = rate(lambda: generate_batch(ours, prompts, greedy), batch_tokens)
    rows["llmctl, torch's products"] = (torch_1, torch_b)
    in_passing_thread(lambda: use_decode_kernels(ours))  # what `chat`, `serve` and `eval` do at load
    rows["llmctl eager"] = (
        rate(lambda: list(generate_ids(ours, prompt, greedy)), args.new_tokens),
        rate(lambda: generate_batch(ours, prompts, greedy), batch_tokens),
    )
    compiled = in_passing_thread(lambda: copy.deepcopy(ours))
    started = time.perf_counter()
    # `llmctl serve --compile`: loaded and warmed up in a passing thread
    engine = in_passing_thread(lambda: Engine(compiled, max_batch=args.batch, compile=True).start())
    compile_seconds = time.perf_counter() - started
    rows["llmctl compiled"] = alone_and_served(compiled, engine, prompt, greedy, args)
    in_passing_thread(lambda: use_fused_step(ours))  # what `load_for_inference` does for chat and serve
    engine = in_passing_thread(lambda: Engine(ours, max_batch=args.batch).start())
    rows["llmctl fused (default)"] = alone_and_served(ours, engine, prompt, greedy, args)
    rows["transformers generate"] = (
        rate(lambda: hf(1), args.new_tokens),
        rate(lambda: hf(args.batch), batch_tokens),
    )
    llama, why = llama_cpp_decode_speed(work / f"{name}.f32.gguf")
    if llama is not None:
        rows["llama.cpp F32 (2 threads)"] = (llama, None)
        q8_0, note = llama_cpp_decode_speed(work / f"{name}.q8_0.gguf")
        rows["llama.cpp Q8_0 (2 threads)" + (", no repack" if "not repacked" in note else "")] = (q8_0, None)

    bound = bandwidth / weight_bytes_per_step(config)
    print(
        f"\n{name}: {config.num_parameters() / 1e6:.1f}M parameters, fp32; bandwidth bound {bound:.1f} tokens/s "
        f"at batch 1 ({weight_bytes_per_step(config) / 1e6:.0f} MB of weights read per step); "
        f"compile + warm-up {compile_seconds:.0f} s"
    )
    print(
        f"{'':28}{'batch 1 tok/s':>14}{'% of bound':>12}{f'batch {args.batch} tok/s':>16}{'batch ratio':>13}"
    )
    for label, (one, many) in rows.items():
        many_text = f"{many:>16.1f}{many / one:>12.2f}x" if many else f"{'-':>16}{'-':>13}"
        print(f"{label:28}{one:>14.1f}{100 * one / bound:>11.0f}%{many_text}")
    best = rows["llmctl fused (default)"]
    hf_1, hf_b = rows["transformers generate"]
    print(
        f"llmctl fused (chat and serve's default) / transformers: batch 1 {best[0] / hf_1:.2f}x, "
        f"batch {args.batch} {best[1] / hf_b:.2f}x; / llmctl compiled: batch 1 "
        f"{best[0] / rows['llmctl compiled'][0]:.2f}x"
    )
    if llama is not None:
        print(f"llmctl fused (default) / llama.cpp F32 at batch 1: {best[0] / llama:.2f}x (target >= 1.0x)")
    else:
        print(f"llama.cpp: {why}")


if __name__ == "__main__":
    main()
