"""Decode speed: llmctl vs transformers `generate` on identical weights, batch 1 and batch 8, greedy, in one
run, against this machine's memory-bandwidth bound (every weight is read once per decoded token).
llama.cpp runs beside them when `llama-cpp-python` and `gguf` are installed.

    .venv/bin/python -m benchmarks.decode [--shapes tiny,134m] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, memory_bandwidth
from llmctl.infer.cpu_decode import use_numpy_blas
from llmctl.infer.generate import generate_batch, generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict, write_model_files
from llmctl.runtime import keep_freed_memory

SHAPES = {
    "tiny": ModelConfig(vocab_size=8000, d_model=384, n_layer=6, n_head=6, max_seq_len=1024),  # 16.8M
    "134m": ModelConfig(vocab_size=32000, d_model=768, n_layer=12, n_head=12, max_seq_len=1024),  # 134M
}


def rate(fn, tokens: int, repeats: int = 2) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return tokens / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="tiny,134m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    keep_freed_memory()
    bandwidth = memory_bandwidth()
    print(f"machine: {machine()}; measured read bandwidth {bandwidth / 1e9:.1f} GB/s")
    for name in args.shapes.split(","):
        measure(name, SHAPES[name], args, bandwidth)


def measure(name: str, config: ModelConfig, args: argparse.Namespace, bandwidth: float) -> None:
    import transformers

    prompt = list(range(10, 42))
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    work = Path(tempfile.mkdtemp())
    write_model_files(work, config, export_state_dict(ours))
    numpy_rows = use_numpy_blas(ours)  # what `llmctl chat` and `serve` do when they load a checkpoint
    theirs = transformers.AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval()
    hf_kwargs = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0
    )

    def hf(batch_size: int) -> None:
        ids = torch.tensor([prompt] * batch_size)
        with torch.inference_mode():
            theirs.generate(ids, attention_mask=torch.ones_like(ids), **hf_kwargs)

    ours_1 = rate(lambda: list(generate_ids(ours, prompt, greedy)), args.new_tokens)
    hf_1 = rate(lambda: hf(1), args.new_tokens)
    ours_b = rate(lambda: generate_batch(ours, [prompt] * args.batch, greedy), args.new_tokens * args.batch)
    hf_b = rate(lambda: hf(args.batch), args.new_tokens * args.batch)
    bound = bandwidth / (4 * config.num_parameters())
    print(
        f"\n{name}: {config.num_parameters() / 1e6:.1f}M parameters, fp32; bandwidth bound {bound:.1f} tokens/s at batch 1"
    )
    path = f"numpy BLAS up to {numpy_rows} rows" if numpy_rows else "torch (numpy BLAS measured slower here)"
    print(f"llmctl decode path chosen at load: {path}")
    print(f"{'':28}{'batch 1 tok/s':>14}{'% of bound':>12}{f'batch {args.batch} tok/s':>16}")
    for label, one, many in (("llmctl", ours_1, ours_b), ("transformers generate", hf_1, hf_b)):
        print(f"{label:28}{one:>14.1f}{100 * one / bound:>11.0f}%{many:>16.1f}")
    print(
        f"ratio llmctl / transformers: batch 1 {ours_1 / hf_1:.2f}x, batch {args.batch} {ours_b / hf_b:.2f}x"
    )


if __name__ == "__main__":
    main()
