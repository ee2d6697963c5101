"""CUDA checks behind benchmarks/gpu_check.sh: each row runs a real llmctl code path on the GPU."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import fake_tokens
from benchmarks.speculative import engine_outputs
from llmctl.infer.decode import compile_decode
from llmctl.infer.engine import Engine
from llmctl.infer.generate import generate_ids
from llmctl.infer.sampling import SamplingParams
from llmctl.infer.speculative import SpeculationStats, speculative_generate_ids
from llmctl.model import ModelConfig, Transformer
from llmctl.recipe import load_recipe, recipe_from_dict
from llmctl.train.distributed import DistributedContext
from llmctl.train.metrics import device_peak_flops
from llmctl.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def train_row(name: str, work: Path, layers: int, compile_: bool, steps: int = 8) -> tuple[str, str]:
    base = load_recipe(REPO / "recipes" / "1.3b.toml").model_dump()
    base["model"]["n_layer"] = layers
    base["data"] = {"tokens": str(work)}
    base["train"].update(
        steps=steps,
        micro_batch_size=4,
        global_batch_size=4,
        log_every=steps,
        eval_every=0,
        eval_batches=1,
        compile=compile_,
    )
    base["checkpoint"] = {"dir": str(work / name), "every": 0}
    base["distributed"]["strategy"] = "none"
    recipe = recipe_from_dict(base)
    trainer = Trainer(recipe, DistributedContext(0, 0, 1, torch.device("cuda")))
    for step in range(2):  # warm-up (and compilation)
        trainer.train_step(step)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for step in range(2, steps):
        record = trainer.train_step(step)
    torch.cuda.synchronize()
    tokens_per_second = (steps - 2) * 4 * recipe.seq_len / (time.perf_counter() - started)
    peak = device_peak_flops(torch.device("cuda"), "bf16")
    mfu = trainer.flops_per_token * tokens_per_second / peak if peak else float("nan")
    memory = torch.cuda.max_memory_allocated() / 2**30
    return (
        name,
        f"{tokens_per_second:,.0f} tok/s, MFU {100 * mfu:.1f}%, loss {record.loss:.3f}, {memory:.1f} GiB",
    )


def fsdp_row(work: Path) -> tuple[str, str]:
    recipe = work / "fsdp.toml"
    base = load_recipe(REPO / "recipes" / "1.3b.toml").model_dump(mode="json", exclude_none=True)
    base["model"]["n_layer"] = 4
    base["data"] = {"tokens": str(work)}
    base["train"].update(
        steps=6,
        micro_batch_size=2,
        global_batch_size=2,
        log_every=1,
        eval_every=3,
        eval_batches=2,
        compile=False,
    )
    base["checkpoint"] = {"dir": str(work / "fsdp-run"), "every": 0}
    import tomli_w

    recipe.write_text(tomli_w.dumps(base))
    started = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=1",
            "-m",
            "llmctl",
            "train",
            str(recipe),
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        return "FSDP2 x1 (torchrun)", "FAILED: " + (result.stderr.strip().splitlines() or ["?"])[-1]
    saved = list((work / "fsdp-run" / "checkpoints").glob("step-*/model.safetensors"))
    return (
        "FSDP2 x1 (torchrun)",
        f"ok in {seconds:.0f} s, consolidated checkpoint: {'yes' if saved else 'NO'}",
    )


def decode_row(mode: str) -> tuple[str, str]:
    """Batch-1 greedy decode of the 134M shape in bf16: eager, the compiled step (`compile_decode`: CUDA
    graphs), or speculative with a 2-layer draft (`speculative_generate_ids`), checked against eager."""
    config = ModelConfig(vocab_size=32000, d_model=768, n_layer=12, n_head=12, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(config).cuda().to(torch.bfloat16).eval()
    params = SamplingParams(max_new_tokens=128, temperature=0.0)
    prompt = list(range(10, 42))
    reference = list(generate_ids(model, prompt, params))
    if mode == "compiled":
        compile_decode(model)
        generate = lambda: generate_ids(model, prompt, params)  # noqa: E731
    elif mode == "speculative":
        draft = Transformer(replace(config, n_layer=2)).cuda().to(torch.bfloat16).eval()
        stats = SpeculationStats()
        generate = lambda: speculative_generate_ids(model, draft, prompt, params, stats=stats)  # noqa: E731
    else:
        generate = lambda: generate_ids(model, prompt, params)  # noqa: E731
    same = list(generate()) == reference  # also the warm-up (compiles)
    torch.cuda.synchronize()
    started = time.perf_counter()
    produced = len(list(generate()))
    torch.cuda.synchronize()
    rate = produced / (time.perf_counter() - started)
    extra = f", acceptance {stats.acceptance_rate:.0%} (random draft)" if mode == "speculative" else ""
    return f"decode 134M bf16 ({mode})", f"{rate:,.0f} tok/s at batch 1, same tokens as eager: {same}{extra}"


def engine_speculation_row() -> tuple[str, str]:
    """`serve --compile --draft` on the 134M shape in bf16: 8 requests in one continuous batch, each checked
    against its eager greedy tokens alone."""
    config = ModelConfig(vocab_size=32000, d_model=768, n_layer=12, n_head=12, max_seq_len=1024)
    torch.manual_seed(0)
    model = Transformer(config).cuda().to(torch.bfloat16).eval()
    draft = Transformer(replace(config, n_layer=2)).cuda().to(torch.bfloat16).eval()
    params = SamplingParams(max_new_tokens=64, temperature=0.0)
    prompts = [list(range(10 + row, 42 + row)) for row in range(8)]
    reference = [list(generate_ids(model, prompt, params)) for prompt in prompts]
    engine = Engine(model, max_batch=8, compile=True, draft=draft).start()
    try:
        engine_outputs(engine, prompts, params)  # warm-up
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = engine_outputs(engine, prompts, params)
        torch.cuda.synchronize()
        rate = sum(map(len, outputs)) / (time.perf_counter() - started)
    finally:
        engine.stop()
    same = sum(a == b for a, b in zip(outputs, reference, strict=True))
    return (
        "serve engine 134M bf16 (compiled, draft)",
        f"{rate:,.0f} tok/s at 8 rows, same tokens as eager: {same}/8, "
        f"acceptance {engine.speculation.stats.acceptance_rate:.0%} (random draft)",
    )


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible; nothing to check")
    work = Path(tempfile.mkdtemp())
    fake_tokens(work, 50000, 20_000_000)
    print(
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, flash SDPA {torch.backends.cuda.flash_sdp_enabled()}"
    )
    rows = []
    for check in (
        lambda: train_row("train 1.3B-shape, 8 layers, bf16, eager", work, 8, False),
        lambda: train_row("train 1.3B-shape, 8 layers, bf16, compiled", work, 8, True),
        lambda: fsdp_row(work),
        lambda: decode_row("eager"),
        lambda: decode_row("compiled"),
        lambda: decode_row("speculative"),
        engine_speculation_row,
    ):
        try:
            rows.append(check())
        except Exception as error:  # report and continue: one broken path must not hide the others
            rows.append(("(check failed)", f"{type(error).__name__}: {str(error)[:160]}"))
        print(f"{rows[-1][0]:44} {rows[-1][1]}", flush=True)


if __name__ == "__main__":
    main()
