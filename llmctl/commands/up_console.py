"""Rich rendering of `llmctl up`: the plan table, one line per stage (the trainer's own lines during training),
and the summary with the next commands."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmctl.commands.train_console import TrainingConsole
from llmctl.pipeline.budget import PlannedStage
from llmctl.pipeline.request import StageDone, StageStarted, UpRequest, UpResult

TRAINING_STAGES = ("train", "adapt", "chat")


class UpConsole:
    def __init__(self) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.training: TrainingConsole | None = None

    def print_plan(self, request: UpRequest, planned: list[PlannedStage]) -> None:
        origin = f"adapting {request.base_label}" if request.base else "training from scratch"
        table = Table(title=f"llmctl up {request.docs} -> {request.out} ({origin})")
        for column, justify in (("stage", "left"), ("does", "left"), ("minutes", "right"), ("disk", "right")):
            table.add_column(column, justify=justify)
        for stage in planned:
            minutes = f"{stage.seconds / 60:.1f}" + (" (what is left)" if stage.training else "")
            table.add_row(stage.name, stage.what, minutes, _size(stage.disk_bytes))
        total = sum(stage.seconds for stage in planned) / 60
        table.add_row(
            "[bold]total[/]", "", f"[bold]{total:.1f}[/]", _size(sum(s.disk_bytes for s in planned))
        )
        self.console.print(table)

    def on_event(self, event: object) -> None:
        match event:
            case StageStarted(name=name, what=what):
                self.console.print(f"[bold]{name}[/]: {escape(what)}")
                if name in TRAINING_STAGES:
                    self.training = TrainingConsole()
            case StageDone(name=name, seconds=seconds, summary=summary, reused=reused):
                self._close_training()
                how = "reused" if reused else f"done in {seconds:.1f}s"
                self.console.print(f"[bold]{name}[/] {how}: {escape(summary)}")

    def on_training_event(self, event: object) -> None:
        if self.training is not None:
            self.training.on_event(event)

    def interrupted(self, request: UpRequest, stopped: BaseException) -> None:
        self._close_training()
        reason = str(stopped) or "interrupted"
        self.console.print(
            f"[yellow]{escape(reason)}; run the same llmctl up command again to go on from there "
            f"({escape(str(request.out))}/up.json records what is done)[/]"
        )

    def print_summary(self, request: UpRequest, result: UpResult, port: int | None) -> None:
        table = Table(title="held-out evaluation")
        for column in ("model", "perplexity", "bits per byte"):
            table.add_column(column, justify="left" if column == "model" else "right")
        for label, numbers in result.evaluation:
            table.add_row(label, f"{numbers['token_perplexity']:.3f}", f"{numbers['bits_per_byte']:.4f}")
        self.console.print(table)
        reused = sum(stage.reused for stage in result.stages)
        lines = [
            f"model:      {result.model} (registered as {result.registered})",
            f"model card: {result.card}",
            f"report:     {result.report}",
            f"stages:     {len(result.stages)} ({reused} reused)",
            "next:",
            f"  llmctl chat {result.registered}",
            f"  llmctl serve {result.registered}",
            f"  llmctl eval compare {request.out}/evaluate-base.json {request.out}/evaluate.json"
            if request.base
            else f"  llmctl eval {result.registered} --suite domain",
        ]
        if port is not None:
            lines.append(
                f"serving on http://127.0.0.1:{port}/v1; call it with: curl http://127.0.0.1:{port}/v1/chat/"
                f'completions -H "Content-Type: application/json" -d \'{{"model": "{result.model.name}", '
                '"messages": [{"role": "user", "content": "Hello"}]}\''
            )
        for line in lines:
            self.console.print(escape(line))

    def _close_training(self) -> None:
        if self.training is not None:
            self.training.close()
            self.training = None


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
