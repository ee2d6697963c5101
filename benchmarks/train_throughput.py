"""Training throughput: llmctl's trainer vs Hugging Face LlamaForCausalLM + torch.optim.AdamW, same shape,
same weights, same batches, one run. Prints tokens/s of each, the ratio and MFU against the measured peak.

The HF peer runs twice: in this process (after llmctl has tuned the allocator, so kernels are compared
like for like) and in a fresh process with default settings (what a plain transformers user gets).

    .venv/bin/python -m benchmarks.train_throughput [--steps 12] [--d-model 384 --layers 6 --vocab 8000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_shape_arguments, fake_tokens, machine, shape_config, timed_run_sections
from llmctl.model import Transformer
from llmctl.model.hf_format import export_state_dict, write_model_files
from llmctl.train.metrics import measure_cpu_matmul_peak


def batches(args, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    windows = [
        torch.randint(4, args.vocab, (args.batch, args.seq + 1), generator=generator) for _ in range(count)
    ]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def timed(step_fn, args) -> float:
    for step in range(args.warmup):
        step_fn(step)
    started = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        step_fn(step)
    return args.steps * args.batch * args.seq / (time.perf_counter() - started)


def hf_stepper(checkpoint: Path, args):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, attn_implementation="sdpa"
    )
    hf.train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(args, args.warmup + args.steps)

    def step(index: int) -> None:
        inputs, targets = data[index]
        logits = hf(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def llmctl_stepper(work: Path, args):
    from llmctl.recipe import recipe_from_dict
    from llmctl.train.distributed import DistributedContext
    from llmctl.train.trainer import Trainer

    fake_tokens(work, args.vocab, 2_000_000)
    recipe = recipe_from_dict(
        {
            "model": {
                "vocab_size": args.vocab,
                "d_model": args.d_model,
                "n_layer": args.layers,
                "n_head": args.heads,
                "max_seq_len": args.seq,
            },
            "data": {"tokens": str(work)},
            **timed_run_sections(args, work / "run"),
        }
    )
    trainer = Trainer(recipe, DistributedContext(0, 0, 1, torch.device("cpu")))
    return trainer.train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    add_shape_arguments(parser)
    parser.add_argument("--hf-only-from", type=Path, help=argparse.SUPPRESS)  # the fresh-process peer
    args = parser.parse_args()

    if args.hf_only_from:
        print(
            json.dumps(
                {
                    "tokens_per_second": max(
                        timed(hf_stepper(args.hf_only_from, args), args) for _ in range(args.rounds)
                    )
                }
            )
        )
        return

    work = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = shape_config(args)
    write_model_files(work, config, export_state_dict(Transformer(config)))
    fresh = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", *sys.argv[1:], "--hf-only-from", str(work)],
        capture_output=True,
        text=True,
        check=True,
    )
    hf_default = json.loads(fresh.stdout.strip().splitlines()[-1])["tokens_per_second"]

    ours_step = llmctl_stepper(work, args)
    hf_step = hf_stepper(work, args)
    peak = measure_cpu_matmul_peak()
    ours, theirs = [], []
    for _ in range(args.rounds):  # interleaved, so a noisy neighbour hurts both alike; best round of each
        ours.append(timed(ours_step, args))
        theirs.append(timed(hf_step, args))
    ours_tps, hf_tps = max(ours), max(theirs)
    flops = config.flops_per_token(args.seq)
    print(f"machine: {machine()}; measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(
        f"shape: d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, seq {args.seq}, batch {args.batch}, fp32"
    )
    print(f"{'':34}{'tokens/s':>10}{'GFLOP/s':>10}{'MFU':>8}")
    rows = (
        ("llmctl", ours_tps),
        ("HF, same process (tuned malloc)", hf_tps),
        ("HF, fresh process (defaults)", hf_default),
    )
    for name, tps in rows:
        print(f"{name:34}{tps:>10,.0f}{flops * tps / 1e9:>10.1f}{100 * flops * tps / peak:>7.1f}%")
    print(
        f"ratio llmctl / HF same process: {ours_tps / hf_tps:.3f}x; llmctl / HF defaults: {ours_tps / hf_default:.3f}x"
    )


if __name__ == "__main__":
    main()
