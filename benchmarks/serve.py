"""Serving throughput: 16 concurrent streaming clients vs 1 against `llmctl serve` (its own process) on
localhost. Prints total generated tokens/s, p50/p99 time to first token and failed requests for each.

    .venv/bin/python -m benchmarks.serve [--clients 16] [--requests 32] [--max-tokens 64] [--compile]
        [--shared-prefix WORDS] [--prefix-cache-tokens N] [--constrained]

`--constrained` runs the many-client load a second time with every request under a JSON schema
(`response_format`), and prints constrained throughput over unconstrained.

`--shared-prefix` puts the same passage (a system prompt, say) before every prompt, to measure the prefix
cache: run it with `--prefix-cache-tokens 0` and without.

It also splits the many-client run's decode step into where the time went, from the server's own counters
(/metrics `llmctl_time_seconds`): the engine thread's forward, sampling, token delivery and prefill, the event
loop's detokenization and SSE encoding, and what is left of the wall time (waiting, the event loop, HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import machine
from llmctl.checkpoint import save_checkpoint
from llmctl.data.corpus import CorpusOptions, build_corpus
from llmctl.data.tokenizer import open_tokenizer, train_tokenizer
from llmctl.model import ModelConfig, Transformer
from llmctl.model.hf_format import export_state_dict

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The Python tutorial",
    "A list comprehension",
    "To open a file",
    "Exceptions are",
    "The standard library",
]


def server_stack() -> str:
    """What uvicorn runs on here ("auto" takes uvloop and httptools when installed, as the serve extra does)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"event loop {loop}, HTTP {http}"


def checkpoint(work: Path) -> Path:
    sample = REPO / "data" / "sample"
    build_corpus([str(sample / "train.jsonl")], work / "corpus", CorpusOptions())
    train_tokenizer(work / "corpus", work / "tokenizer", 8000)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=8000, d_model=384, n_layer=6, n_head=6, max_seq_len=512)
    model = Transformer(config)
    return save_checkpoint(
        work / "ckpt",
        config,
        export_state_dict(model),
        tokenizer=open_tokenizer(work / "tokenizer" / "tokenizer.model"),
    )


# what --constrained asks for: an object whose one string cannot close within max_tokens, so that constrained
# requests run to max_tokens as free ones do and the two loads generate alike (an object that closes early
# would weigh prefill more, and compare less work)
SCHEMA = {
    "type": "object",
    "properties": {"summary": {"type": "string", "minLength": 1000}},
    "required": ["summary"],
    "additionalProperties": False,
}
JSON_SCHEMA = {
    "response_format": {"type": "json_schema", "json_schema": {"name": "ticket", "schema": SCHEMA}}
}


async def one_request(
    client: httpx.AsyncClient, index: int, max_tokens: int, prefix: str, extra: dict
) -> tuple[float, int] | None:
    body = extra | {
        "model": "bench",
        "prompt": prefix + PROMPTS[index % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": index,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started, first, tokens = time.perf_counter(), None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return None
    return (first if first is not None else time.perf_counter() - started), tokens


async def load(
    base: str, clients: int, requests: int, max_tokens: int, prefix: str = "", extra: dict | None = None
) -> dict:
    semaphore = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def bounded(index: int):
            async with semaphore:
                return await one_request(client, index, max_tokens, prefix, extra or {})

        started = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(requests)))
        seconds = time.perf_counter() - started
    ok = [r for r in results if r is not None]
    ttfts = sorted(r[0] for r in ok)
    return {
        "tokens_per_second": sum(r[1] for r in ok) / seconds,
        "tokens_per_request": sum(r[1] for r in ok) / max(len(ok), 1),
        "p50_ttft": statistics.median(ttfts),
        "p99_ttft": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        "failed": len(results) - len(ok),
    }


def phase_seconds(base: str) -> tuple[dict[str, float], float]:
    """The server's cumulative seconds per phase and its decode steps, read from /metrics."""
    seconds, steps = {}, 0.0
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("llmctl_prefix_cache{"):
            measure = line.split('measure="')[1].split('"')[0]
            seconds[f"prefix cache {measure}"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("llmctl_time_seconds{"):
            phase = line.split('phase="')[1].split('"')[0]
            seconds[phase] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("llmctl_decode_steps{"):
            steps = float(line.rsplit(" ", 1)[1])
    return seconds, steps


def print_profile(
    before: tuple[dict[str, float], float], after: tuple[dict[str, float], float], wall: float
) -> None:
    steps = after[1] - before[1]
    cache = {name: value for name, value in after[0].items() if name.startswith("prefix cache")}
    spent = {
        phase: seconds - before[0].get(phase, 0.0)
        for phase, seconds in after[0].items()
        if phase not in cache
    }
    print(f"\nwhere a decode step's time went ({steps:.0f} steps, {1000 * wall / steps:.2f} ms each):")
    for phase, seconds in spent.items():
        print(f"  {phase:12}{1000 * seconds / steps:>8.2f} ms  {100 * seconds / wall:>5.1f}%")
    engine = sum(spent[phase] for phase in ("prefill", "forward", "sampling", "delivery"))
    rest = wall - engine
    print(
        f"  {'engine idle':12}{1000 * rest / steps:>8.2f} ms  {100 * rest / wall:>5.1f}%  (waiting for requests, the GIL)"
    )
    if cache:
        print("whole run: " + ", ".join(f"{name} {value:g}" for name, value in cache.items()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="serve with --compile")
    parser.add_argument("--shared-prefix", type=int, default=0, help="words of a passage before every prompt")
    parser.add_argument("--prefix-cache-tokens", type=int, default=4096)
    parser.add_argument(
        "--constrained", action="store_true", help="also the many-client load under a JSON schema"
    )
    args = parser.parse_args()
    path = checkpoint(Path(tempfile.mkdtemp()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "llmctl",
        "serve",
        f"bench={path}",
        "--port",
        str(port),
        "--max-batch",
        str(args.clients),
        "--compile" if args.compile else "--no-compile",  # no background compile during the measurement
        "--prefix-cache-tokens",
        str(args.prefix_cache_tokens),
    ]
    words = (REPO / "data" / "sample" / "val.jsonl").read_text().split()
    prefix = " ".join(words[: args.shared_prefix]) + "\n\n" if args.shared_prefix else ""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # compiling takes minutes on two cores
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit("llmctl serve did not come up")
            time.sleep(0.2)
        single = asyncio.run(load(base, 1, max(4, args.requests // 4), args.max_tokens, prefix))
        before, started = phase_seconds(base), time.perf_counter()
        many = asyncio.run(load(base, args.clients, args.requests, args.max_tokens, prefix))
        wall, after = time.perf_counter() - started, phase_seconds(base)
        constrained = None
        if args.constrained:
            constrained = asyncio.run(
                load(base, args.clients, args.requests, args.max_tokens, prefix, JSON_SCHEMA)
            )
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(
        f"machine: {machine()}; model 16.8M parameters (d384 x 6, vocab 8000), fp32, max_tokens {args.max_tokens}, "
        f"decode step: the fused one for up to 16 rows, else {'compiled' if args.compile else 'eager'}; "
        f"shared prefix {args.shared_prefix} words, "
        f"prefix cache {args.prefix_cache_tokens} tokens; uvicorn's {server_stack()}"
    )
    print(f"{'clients':>8}{'tokens/s':>12}{'p50 TTFT ms':>14}{'p99 TTFT ms':>14}{'failed':>8}")
    for clients, result in ((1, single), (args.clients, many)):
        print(
            f"{clients:>8}{result['tokens_per_second']:>12.1f}{1000 * result['p50_ttft']:>14.1f}{1000 * result['p99_ttft']:>14.1f}{result['failed']:>8}"
        )
    print(
        f"throughput ratio {args.clients} clients / 1 client: {many['tokens_per_second'] / single['tokens_per_second']:.2f}x"
    )
    print_profile(before, after, wall)
    if constrained is not None:
        ratio = constrained["tokens_per_second"] / many["tokens_per_second"]
        print(
            f"{args.clients} clients under a JSON schema: {constrained['tokens_per_second']:.1f} tokens/s, "
            f"{constrained['tokens_per_request']:.1f} tokens a request (free text: {many['tokens_per_request']:.1f}), "
            f"{constrained['failed']} failed; constrained / unconstrained {ratio:.2f}x (target >= 0.9x)"
        )


if __name__ == "__main__":
    main()
