"""The Textual training monitor: a runs list, the selected run's numbers, loss curves, samples, events and
per-rank rows, following each run's `metrics.jsonl` as its trainer appends to it; `enter` opens the chat
screen on the run's newest checkpoint."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from llmctl.errors import UserError
from llmctl.train.run_log import RunLog, find_runs, format_bytes, format_duration, summary

REDISCOVER_EVERY = 5  # polls between looks for new runs under the roots
EVENTS_SHOWN = 8
BAR_WIDTH = 30


def last_line(path: Path, tail_bytes: int = 4096) -> str:
    """The last line with words of a file another process is writing (not a table's border), read from its
    tail only."""
    try:
        with path.open("rb") as file:
            file.seek(max(0, file.seek(0, 2) - tail_bytes))
            text = file.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if any(map(str.isalnum, line))]
    return lines[-1] if lines else ""


def progress_bar(step: int, total: int | None) -> str:
    if not total:
        return ""
    done = min(max(step / total, 0.0), 1.0)
    filled = round(done * BAR_WIDTH)
    return f"{'█' * filled}{'░' * (BAR_WIDTH - filled)} {100 * done:.0f}%"


def describe_event(record: dict) -> str:
    def saved(key: str) -> str:
        return Path(str(record.get(key))).name

    match record.get("event"):
        case "started":
            text = (
                f"started: {record.get('world_size')} x {record.get('device')}, {record.get('steps')} steps"
            )
        case "checkpoint":
            text = f"checkpoint saved: {saved('path')}"
        case "skipped":
            text = f"non-finite step skipped (grad norm {record.get('grad_norm')})"
        case "resumed":
            text = f"resumed from {saved('checkpoint')}"
        case "checkpoint_rejected":
            text = f"damaged checkpoint passed over: {saved('path')}"
        case "interrupted":
            text = f"interrupted; saved {saved('checkpoint')}"
        case "teacher_cache":
            text = f"teacher cache {saved('path')}: top {record.get('top_k')} logits, teacher no longer run"
        case _:
            text = f"finished; saved {saved('checkpoint')}"
    return f"{record.get('step', 0):>7}  {text}"


class RunsTable(DataTable):
    """The runs list; its own `enter` (select the row) opens chat, and the footer says so."""

    BINDINGS = [Binding("enter", "select_cursor", "chat")]


class MonitorApp(App):
    TITLE = "llmctl monitor"
    CSS = """
    #runs { height: auto; max-height: 9; }
    #summary { padding: 0 1; height: auto; }
    #ranks { height: auto; max-height: 6; }
    #plot { min-height: 10; }
    #bottom { height: 9; }
    #events, #samples { width: 1fr; padding: 0 1; border-top: solid $primary-background; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("p", "pause", "pause following"),
        Binding("l", "log_scale", "log scale"),
        Binding("c", "compare", "compare"),
        Binding("space", "mark", "mark for compare"),
        Binding("enter", "chat", "chat", show=False),  # shown by the runs list, which takes the key first
    ]

    def __init__(
        self,
        roots: list[Path],
        poll_seconds: float = 1.0,
        training: subprocess.Popen | None = None,
        training_output: Path | None = None,
    ) -> None:
        super().__init__()
        self.roots = [Path(root) for root in roots]
        self.poll_seconds = poll_seconds
        self.training = training  # `llmctl train --tui`: the trainer this monitor started
        self.training_output = training_output  # its console output, whose last line heads the screen
        self.training_ended = False
        self.stop_requested = False  # whether quitting asked the trainer to stop
        self.logs: dict[Path, RunLog] = {}
        self.selected: Path | None = None
        self.marked: set[Path] = set()
        self.paused = self.log_scale = self.comparing = False
        self.polls = 0

    def compose(self) -> ComposeResult:
        yield Header()
        yield RunsTable(id="runs", cursor_type="row", zebra_stripes=True)
        with Vertical():
            yield Static(id="summary", markup=False)
            yield DataTable(id="ranks", show_cursor=False)
            yield PlotextPlot(id="plot")
            with Horizontal(id="bottom"):
                yield Static(id="events", markup=False)
                yield Static(id="samples", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        runs = self.query_one("#runs", DataTable)
        runs.add_columns(" ", "run", "status", "step", "best val", "last checkpoint", "age")
        self.query_one("#ranks", DataTable).add_columns("rank", "step", "tokens/s", "memory", "age")
        self.query_one("#ranks").display = False
        self.poll()
        self.set_interval(self.poll_seconds, self.poll)

    # -- following -----------------------------------------------------------------------------------------

    def poll(self) -> None:
        """Read what every run appended since the last poll and redraw what changed (not when paused)."""
        self._watch_training()
        if self.paused:
            return
        if self.polls % REDISCOVER_EVERY == 0:
            for path in find_runs(self.roots) or self.roots:
                self.logs.setdefault(path, RunLog(path))
        self.polls += 1
        changed = [path for path, log in self.logs.items() if log.poll()]
        if self.selected is None and self.logs:
            self.selected = next(iter(self.logs))
            changed.append(self.selected)
        self._draw_runs()
        if self.selected in changed or (self.comparing and changed):
            self._draw_detail()
        elif self.selected is not None:
            self._draw_summary(self.logs[self.selected])  # the age and status move on without new lines

    def _watch_training(self) -> None:
        if self.training_output is not None:  # what the child says before any run exists (`up`'s stages)
            self.sub_title = last_line(self.training_output)
        if self.training is None or self.training_ended or self.training.poll() is None:
            return
        self.training_ended = True
        code = self.training.returncode
        self.notify(
            f"training exited ({code})" + ("" if code == 0 else ": its output follows when you quit"),
            severity="information" if code == 0 else "error",
            timeout=30,
        )

    # -- drawing -------------------------------------------------------------------------------------------

    def _draw_runs(self) -> None:
        table = self.query_one("#runs", DataTable)
        now = time.time()
        for path, log in self.logs.items():
            info = summary(log)
            checkpoint = Path(log.last_checkpoint).name if log.last_checkpoint else "-"
            age = log.age_seconds(now)
            row = (
                "●" if path in self.marked else " ",
                log.name if len(self.logs) == 1 else f"{log.name} ({path})",
                info["status"],
                info["step"],
                info["best val loss"],
                checkpoint,
                format_duration(age) if age is not None else "-",
            )
            key = str(path)
            if key in table.rows:
                for column, value in zip(table.columns, row, strict=True):
                    table.update_cell(key, column, value)
            else:
                table.add_row(*row, key=key)

    def _draw_detail(self) -> None:
        if self.selected is None:
            return
        log = self.logs[self.selected]
        self._draw_summary(log)
        self._draw_ranks(log)
        self._draw_plot(log)
        self.query_one("#events", Static).update(
            "events\n" + "\n".join(describe_event(record) for record in list(log.events)[-EVENTS_SHOWN:])
        )
        samples = "\n".join(f"{record['prompt']!r} -> {record['text']!r}" for record in log.samples)
        step = f" (step {log.samples[0].get('step')})" if log.samples else ""
        self.query_one("#samples", Static).update(f"latest samples{step}\n{samples or '-'}")

    def _draw_summary(self, log: RunLog) -> None:
        info = summary(log)
        started = log.started or {}
        setup = (
            f"{started.get('world_size')} x {started.get('device')} ({started.get('strategy')}, "
            f"{started.get('precision')}), {started.get('parameters', 0):,} parameters"
            if started
            else "waiting for the first record"
        )
        state = "paused" if self.paused else info["status"]
        lines = [
            f"{log.name} · {state} · {setup}",
            f"step {info['step']}  {progress_bar(log.step, log.total_steps)}  ETA {info['ETA']}  "
            f"elapsed {info['elapsed']}",
            "  ".join(
                f"{label} {info[label]}"
                for label in ("train loss", "val loss", "best val loss", "lr", "grad norm", "tokens/s", "MFU")
            )
            + f"  memory {info['memory']}",
        ]
        self.query_one("#summary", Static).update("\n".join(lines))

    def _draw_ranks(self, log: RunLog) -> None:
        table = self.query_one("#ranks", DataTable)
        table.display = bool(log.ranks)
        table.clear()
        now = time.time()
        for rank, row in sorted(log.ranks.items()):
            table.add_row(
                str(rank),
                str(row.step),
                f"{row.tokens_per_second:,.0f}" if math.isfinite(row.tokens_per_second) else "-",
                format_bytes(row.memory_bytes),
                format_duration(now - row.modified),
            )

    def _draw_plot(self, log: RunLog) -> None:
        """Loss curves; in log scale the values are plotted as log10 with their real values on the ticks
        (plotext's own log axis fails on several labelled series)."""
        widget = self.query_one("#plot", PlotextPlot)
        plt = widget.plt
        plt.clear_figure()
        if self.comparing:
            shown = [self.logs[path] for path in (self.marked or self.logs)]
            curves = [(other.name, other.curves["loss"]) for other in shown]
            plt.title(f"training loss, {len(shown)} runs compared")
        else:
            curves = [("train loss", log.curves["loss"]), ("val loss", log.curves["val_loss"])]
            plt.title(f"{log.name}: loss")
        drawn: list[float] = []
        for label, curve in curves:
            values = curve.values
            if self.log_scale:
                values = [math.log10(v) if v > 0 else math.nan for v in values]
            if len(curve):
                plt.plot(curve.steps, values, label=label, marker="braille")
                drawn += [v for v in values if math.isfinite(v)]
        if self.log_scale and drawn:
            low, high = min(drawn), max(drawn)
            ticks = [low + (high - low) * i / 4 for i in range(5)]
            plt.yticks(ticks, [f"{10**tick:.3g}" for tick in ticks])
            plt.ylabel("log scale")
        plt.xlabel("step")
        widget.refresh()

    # -- keys ----------------------------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "runs" and event.row_key.value is not None:
            self.selected = Path(event.row_key.value)
            self._draw_detail()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """`enter` on the runs list (the table takes the key before the app's binding sees it)."""
        if event.data_table.id == "runs":
            self.action_chat()

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.sub_title = "paused" if self.paused else ""
        if self.selected is not None:
            self._draw_summary(self.logs[self.selected])

    def action_log_scale(self) -> None:
        self.log_scale = not self.log_scale
        self._draw_detail()

    def action_compare(self) -> None:
        self.comparing = not self.comparing
        self._draw_detail()

    def action_mark(self) -> None:
        if self.selected is not None:
            self.marked ^= {self.selected}
            self._draw_runs()
            if self.comparing:
                self._draw_detail()

    def action_chat(self) -> None:
        from llmctl.checkpoint import latest_checkpoint

        if self.selected is None:
            return
        checkpoint = latest_checkpoint(self.selected)
        if checkpoint is None:
            self.notify(f"{self.logs[self.selected].name} has no checkpoint yet", severity="warning")
            return
        self.notify(f"opening {checkpoint} ...")
        self.open_chat(checkpoint)

    @work(thread=True, exclusive=True, group="chat")
    def open_chat(self, checkpoint: Path) -> None:
        from llmctl.infer.chat_session import ChatSession
        from llmctl.infer.decode import load_for_inference, open_chat
        from llmctl.tui.chat import ChatScreen

        try:
            model, tokenizer = load_for_inference(checkpoint)
            chat = open_chat(checkpoint, tokenizer)
        except UserError as error:
            self.call_from_thread(self.notify, str(error), severity="error")
            return
        screen = ChatScreen(ChatSession(model, tokenizer, chat), str(checkpoint), closable=True)
        self.call_from_thread(self.push_screen, screen)

    async def action_quit(self) -> None:
        """Quit; a trainer this monitor started is asked to stop (it checkpoints first, and resumes with
        --resume auto)."""
        if self.training is not None and self.training.poll() is None:
            self.training.send_signal(signal.SIGINT)
            self.stop_requested = True
        self.exit()
