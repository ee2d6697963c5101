"""Rich rendering of a training plan (kept out of the engine, which never imports Rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
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


class TrainingConsole:
    """Prints the trainer's events: plain lines when piped, the same lines above a live status on a TTY."""

    def __init__(self, recipe: Recipe, enabled: bool = True) -> None:
        self.recipe, self.enabled = recipe, enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.log_file = None
        self.progress: Progress | None = None
        self.task = None

    def start(self, trainer) -> None:
        if not self.enabled:
            return
        trainer.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = (trainer.run_dir / "train.log").open("a")
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task(self.recipe.name, total=self.recipe.train.steps, status="")
            self.progress.start()
        self._print(
            f"training {self.recipe.name}: {trainer.model.config.num_parameters():,} parameters on "
            f"{trainer.context.world_size} x {trainer.context.device.type} ({trainer.strategy}, "
            f"{self.recipe.train.precision}), {self.recipe.train.steps} steps of "
            f"{self.recipe.train.global_batch_size} x {trainer.seq_len} tokens -> {trainer.run_dir}"
        )

    def on_event(self, kind: str, data: dict) -> None:
        if not self.enabled:
            return
        if kind == "step":
            line = (
                f"step {data['step']:>6}/{self.recipe.train.steps}  loss {data['loss']:.4f}  "
                f"lr {data['lr']:.2e}  grad {data['grad_norm']:.3f}  "
                f"{data.get('tokens_per_second', 0):,.0f} tok/s"
            )
            if "mfu" in data:
                line += f"  MFU {100 * data['mfu']:.1f}%"
            if self.progress is not None:
                status = f"loss {data['loss']:.3f} · {data.get('tokens_per_second', 0):,.0f} tok/s"
                self.progress.update(self.task, completed=data["step"], status=status)
            self._print(line)
        elif kind == "eval":
            self._print(
                f"step {data['step']:>6}  val loss {data['val_loss']:.4f}  val ppl {data['val_ppl']:.2f}"
            )
        elif kind == "skipped":
            self._print(
                f"step {data['step']:>6}  [yellow]skipped: non-finite gradients (norm {data['grad_norm']})[/]"
            )
        elif kind == "checkpoint":
            self._print(f"saved {data['path']}")
        elif kind == "resumed":
            self._print(f"resumed from {data['checkpoint']} at step {data['step']}")
        elif kind == "interrupted":
            self._print(f"[yellow]interrupted at step {data['step']}; saved {data['checkpoint']}[/]")

    def finish(self, result) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        for prompt, text in result.samples:
            self._print(f"[bold]sample[/] {prompt!r} -> {text!r}")
        if result.val_loss is not None:
            self._print(
                f"done: step {result.final_step}, val loss {result.val_loss:.4f}, checkpoint {result.checkpoint}"
            )
        if self.log_file is not None:
            self.log_file.close()

    def _print(self, line: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(line)
        if self.log_file is not None:
            from rich.text import Text

            self.log_file.write(Text.from_markup(line).plain + "\n")
            self.log_file.flush()
