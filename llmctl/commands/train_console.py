"""Rich rendering of a training plan (kept out of the engine, which never imports Rich)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.syntax import Syntax
from rich.table import Table

from llmctl.recipe import Recipe
from llmctl.train import events
from llmctl.train.plan import GIB, TrainingPlan


def print_plan(recipe: Recipe, plan: TrainingPlan) -> None:
    console = Console()
    console.print(Syntax(recipe.to_toml(), "toml", theme="ansi_dark", background_color="default"))
    table = Table(title=f"plan for {recipe.name}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("parameters", f"{plan.parameters:,} ({plan.parameters / 1e9:.2f}B)"),
        *([("trainable (adapter)", f"{plan.trainable:,}")] if plan.trainable != plan.parameters else []),
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

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(highlight=False, soft_wrap=True)
        self.log_file = None
        self.progress: Progress | None = None
        self.task = None
        self.total_steps = 0

    def on_event(self, event: events.Event) -> None:
        if not self.enabled:
            return
        match event:
            case events.Started():
                self._start(event)
            case events.StepLogged():
                line = (
                    f"step {event.step:>6}/{self.total_steps}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                    f"grad {event.grad_norm:.3f}  {event.tokens_per_second:,.0f} tok/s"
                )
                if event.mfu is not None:
                    line += f"  MFU {100 * event.mfu:.1f}%"
                if self.progress is not None:
                    status = f"loss {event.loss:.3f} · {event.tokens_per_second:,.0f} tok/s"
                    self.progress.update(self.task, completed=event.step, status=status)
                self._print(line)
            case events.Evaluated():
                self._print(
                    f"step {event.step:>6}  val loss {event.val_loss:.4f}  val ppl {event.val_ppl:.2f}"
                )
            case events.StepSkipped():
                self._print(
                    f"step {event.step:>6}  [yellow]skipped: non-finite gradients (norm {event.grad_norm})[/]"
                )
            case events.CheckpointSaved():
                self._print(f"saved {escape(event.path)}")
            case events.Resumed():
                self._print(f"resumed from {escape(event.checkpoint)} at step {event.step}")
            case events.CheckpointRejected():
                self._print(
                    f"[yellow]warning: skipped the damaged checkpoint {escape(event.path)} "
                    f"({escape(event.reason)})[/]"
                )
            case events.TeacherCached():
                how = "reused" if event.build_seconds is None else f"built in {event.build_seconds:.1f} s"
                self._print(
                    f"teacher cache {escape(event.path)} ({how}): top {event.top_k} logits of "
                    f"{event.rows:,} positions; training does not run the teacher"
                )
            case events.Sampled():
                self._print(
                    f"step {event.step:>6}  [bold]sample[/] {escape(repr(event.prompt))} -> {escape(repr(event.text))}"
                )
            case events.Interrupted():
                self._print(
                    f"[yellow]interrupted at step {event.step}; saved {escape(str(event.checkpoint))}[/]"
                )

    def _start(self, event: events.Started) -> None:
        self.total_steps = event.steps
        self.log_file = (Path(event.run_dir) / "train.log").open("a")
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
            self.task = self.progress.add_task(event.name, total=event.steps, completed=event.step, status="")
            self.progress.start()
        trainable = event.trainable_parameters
        parameters = f"{event.parameters:,} parameters"
        if trainable is not None and trainable < event.parameters:
            parameters += f" ({trainable:,} trainable, {100 * trainable / event.parameters:.2f}%)"
        self._print(
            f"training {escape(event.name)}: {parameters} on {event.world_size} x {event.device} "
            f"({event.strategy}, {event.precision}), {event.steps} steps of {event.global_batch_size} x "
            f"{event.seq_len} tokens -> {escape(event.run_dir)}"
        )
        if event.validation_tokens == 0:
            self._print(
                f"[yellow]no held-out loss: the validation split is shorter than one window of {event.seq_len} "
                "tokens (build the corpus with a larger --val-fraction, or more documents)[/]"
            )

    def finish(self, result) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if result.val_loss is not None:
            self._print(
                f"done: step {result.final_step}, val loss {result.val_loss:.4f}, "
                f"checkpoint {escape(str(result.checkpoint))}"
            )
        self.close()

    def close(self) -> None:
        """Stop the live status and close the run's train.log."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def _print(self, line: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(line)
        if self.log_file is not None:
            from rich.text import Text

            self.log_file.write(Text.from_markup(line).plain + "\n")
            self.log_file.flush()
