"""Finetuning throughput and memory: llmctl LoRA vs llmctl full finetuning vs PEFT LoRA on transformers, on the
same base weights and the same batches, one run. Each method trains in a fresh process so its peak resident
memory is its own.

    .venv/bin/python -m benchmarks.finetune [--steps 10] [--d-model 384 --layers 6 --vocab 8000] [--rank 8]

LoRA targets every projection of every block (q, k, v, o, gate, up, down), rank 8, alpha 16, no dropout.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    add_shape_arguments,
    fake_tokens,
    machine,
    sample_tokenizer,
    shape_config,
    timed_run_sections,
)
from llmctl.recipe import ALL_LINEAR

METHODS = ("llmctl lora", "llmctl full", "peft + transformers lora")


def batches(args, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    windows = [
        torch.randint(4, args.vocab, (args.batch, args.seq + 1), generator=generator) for _ in range(count)
    ]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def llmctl_stepper(base: Path, method: str, args):
    from llmctl.recipe import recipe_from_dict
    from llmctl.train.distributed import DistributedContext
    from llmctl.train.finetune import FinetuneTrainer, finetune_recipe

    recipe = recipe_from_dict(
        {
            "finetune": {
                "base": str(base),
                "method": method,
                "lora": {"rank": args.rank, "alpha": 2 * args.rank},
            },
            "data": {"tokens": str(base.parent / "tokens")},
            **timed_run_sections(args, base.parent / f"run-{method}"),
        }
    )
    trainer = FinetuneTrainer(finetune_recipe(recipe), DistributedContext(0, 0, 1, torch.device("cpu")))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return trainer.train_step, trainable


def peft_stepper(base: Path, args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    config = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(args, args.warmup + args.steps)

    def step(index: int) -> None:
        inputs, targets = data[index]
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def measure(base: Path, method: str, args) -> dict:
    """Tokens/s (best of the rounds, after warm-up) and peak resident memory of this process."""
    if method == "peft + transformers lora":
        step, trainable = peft_stepper(base, args)
    else:
        step, trainable = llmctl_stepper(base, method.split()[-1], args)
    for index in range(args.warmup):
        step(index)
    started = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        step(index)
    seconds = time.perf_counter() - started
    return {
        "tokens_per_second": args.steps * args.batch * args.seq / seconds,
        "trainable": trainable,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def build_base(work: Path, args) -> Path:
    """A random base checkpoint with a sentencepiece tokenizer, and token files made for that tokenizer."""
    from llmctl.checkpoint import save_checkpoint
    from llmctl.model import Transformer
    from llmctl.model.hf_format import export_state_dict

    tokenizer = sample_tokenizer(work, args.vocab)
    torch.manual_seed(0)
    config = shape_config(args)
    base = save_checkpoint(work / "base", config, export_state_dict(Transformer(config)), tokenizer=tokenizer)
    (work / "tokens").mkdir()
    fake_tokens(work / "tokens", args.vocab, 500_000, tokenizer_sha256=tokenizer.sha256())
    return base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    add_shape_arguments(parser)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)  # a child process: one method
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.base, args.one, args)))
        return

    base = build_base(Path(tempfile.mkdtemp()), args)
    results: dict[str, list[dict]] = {method: [] for method in METHODS}
    for _ in range(args.rounds):  # interleaved, so a noisy neighbour hurts every method alike
        for method in METHODS:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.finetune",
                    *sys.argv[1:],
                    "--one",
                    method,
                    "--base",
                    str(base),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[method].append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"machine: {machine()}")
    print(
        f"shape: d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, batch "
        f"{args.batch}, fp32; LoRA rank {args.rank} on {', '.join(ALL_LINEAR)}; best of {args.rounds} rounds"
    )
    print(f"{'method':28}{'trainable':>12}{'tokens/s':>10}{'peak RSS':>11}")
    best = {method: max(runs, key=lambda run: run["tokens_per_second"]) for method, runs in results.items()}
    for method, run in best.items():
        rss = min(r["peak_rss_bytes"] for r in results[method]) / 2**20
        print(f"{method:28}{run['trainable']:>12,}{run['tokens_per_second']:>10,.0f}{rss:>8,.0f} MiB")
    ours, full, peft = (best[method]["tokens_per_second"] for method in METHODS)
    print(f"llmctl lora / peft lora: {ours / peft:.3f}x; llmctl lora / llmctl full: {ours / full:.3f}x")


if __name__ == "__main__":
    main()
