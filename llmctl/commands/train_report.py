"""Rich rendering of a training plan (kept out of the engine, which never imports Rich)."""

from __future__ import annotations

from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from llmctl.recipe import Recipe
from llmctl.train.plan import GIB, TrainingPlan


def print_plan(recipe: Recipe, plan: TrainingPlan) -> None:
    console = Console()
    console.print(Syntax(recipe.to_toml(), "toml", theme="ansi_dark", background_color="default"))
    table = Table(title=f"plan for {recipe.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e9:.2f}B)"),
        ("devices", f"{plan.world_size} ({plan.strategy}, {plan.precision})"),
        ("micro batch x accumulation", f"{plan.micro_batch_size} x {plan.grad_accum_steps}"),
        ("sequence length", f"{plan.seq_len:,}"),
        ("tokens per step", f"{plan.tokens_per_step:,}"),
        ("steps", f"{plan.steps:,}"),
        ("total tokens", f"{plan.total_tokens:,} ({plan.total_tokens / 1e9:.2f}B)"),
        ("FLOPs per token", f"{plan.flops_per_token:,} ({plan.flops_per_token / 1e9:.2f} GFLOP)"),
        ("total FLOPs", f"{plan.flops_per_token * plan.total_tokens:.3e}"),
    ]
    rows += [(f"memory: {name}", f"{size / GIB:,.2f} GiB") for name, size in plan.memory.items()]
    rows.append(("memory per device (estimate)", f"{plan.memory_per_device / GIB:,.1f} GiB"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
