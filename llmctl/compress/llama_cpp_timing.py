"""Batch-1 greedy decode speed of llama.cpp (llama-cpp-python, 2 threads) on a GGUF file, timed as llmctl's
own decoding is (llmctl.compress.measure), run as its own process by `llmctl.compress.run`:

    python -m llmctl.compress.llama_cpp_timing FILE.gguf [--no-repack]

A process of its own because llama.cpp can crash (llama-cpp-python 0.3.36 on an AVX-512 CPU segfaults
decoding Q8_0 weights it has repacked), which must not take llmctl down, and because its CPU backend shares
torch's libgomp, whose thread pool then dies with the process. `--no-repack` is llama-cli's flag of that name:
weights stay as the file stores them."""

from __future__ import annotations

import argparse

from llmctl.compress.measure import DECODE_PROMPT, DECODE_TOKENS, best_tokens_per_second


def llama_cpp_tokens_per_second(path: str, repack: bool = True) -> float:
    import llama_cpp

    if not repack:
        default = llama_cpp.llama_model_default_params

        def without_repacking():
            params = default()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = without_repacking
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_threads=2, verbose=False)

    def decode() -> int:
        llm.reset()
        produced = 0
        for _token in llm.generate(DECODE_PROMPT, top_k=1, temp=0.0):
            produced += 1
            if produced == DECODE_TOKENS:
                break
        return produced

    try:
        return best_tokens_per_second(decode)
    finally:
        llm.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("--no-repack", action="store_true")
    args = parser.parse_args()
    print(llama_cpp_tokens_per_second(args.path, repack=not args.no_repack))


if __name__ == "__main__":
    main()
