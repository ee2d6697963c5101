"""A run directory read while its trainer writes it: what the monitor shows and the report plots.

Reading never blocks or slows the writer: each poll opens `metrics.jsonl`, reads only the bytes appended since
the last poll and closes it again. A line without its newline yet waits for the next poll; a line that is
not a JSON object (a crash's leftover) is skipped; a `resumed` record drops what the resumed run redoes; a
file that shrank or was replaced (`--overwrite`) is read again from the start. Curves keep at most a fixed
number of points however long the run, so memory stays flat.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.append_log import parse_record

METRICS_FILE = "metrics.jsonl"  # every record of a run, appended by rank 0
RANKS_DIR = "ranks"  # under torchrun, ranks/rank-N.jsonl: each rank's own throughput records
POLL_BYTES = 8 << 20  # read at most this much per poll, so a huge file never freezes a view
STALLED_SECONDS = 600  # no record for this long, and no end recorded: the trainer probably died
CURVES = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_second", "mfu", "memory_bytes")
EVENT_KINDS = (
    "started",
    "checkpoint",
    "skipped",
    "resumed",
    "checkpoint_rejected",
    "interrupted",
    "finished",
    "teacher_cache",
)


@dataclass
class Series:
    """(step, value) points, at most `capacity`: when full, every other point goes and only every
    `stride`-th new one is kept, so a curve of a million steps costs what one of `capacity` steps does."""

    capacity: int = 2000
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    stride: int = 1
    offered: int = 0

    def add(self, step: int, value: float) -> None:
        if self.offered % self.stride == 0:
            self.steps.append(step)
            self.values.append(value)
            if len(self.steps) > self.capacity:
                self.steps, self.values = self.steps[::2], self.values[::2]
                self.stride *= 2
        self.offered += 1

    def drop_after(self, step: int) -> None:
        kept = sum(1 for s in self.steps if s <= step)
        self.steps, self.values = self.steps[:kept], self.values[:kept]

    def __len__(self) -> int:
        return len(self.steps)


class LineTail:
    """The complete JSON-object lines appended to a file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.identity: tuple[int, int] | None = None  # (device, inode): a replaced file starts over
        self.modified = 0.0

    def read(self) -> tuple[list[dict], bool]:
        """(new records, whether the file was replaced or truncated and must be read from the start)."""
        try:
            status = os.stat(self.path)
        except FileNotFoundError:
            return [], False
        identity = (status.st_dev, status.st_ino)
        restarted = self.identity is not None and (identity != self.identity or status.st_size < self.offset)
        if restarted or self.identity is None:
            self.offset, self.partial, self.identity = 0, b"", identity
        self.modified = status.st_mtime
        if status.st_size == self.offset:
            return [], restarted
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(min(POLL_BYTES, status.st_size - self.offset))
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        return [record for line in lines if (record := parse_record(line)) is not None], restarted


@dataclass
class RankRow:
    rank: int
    step: int
    tokens_per_second: float
    memory_bytes: float
    modified: float


class RunLog:
    """One run's state as its records stand: latest numbers, curves, events, samples and per-rank rows."""

    def __init__(self, run_dir: Path, capacity: int = 2000, events_kept: int = 200) -> None:
        self.run_dir = Path(run_dir)
        self.capacity, self.events_kept = capacity, events_kept
        self.tail = LineTail(self.run_dir / METRICS_FILE)
        self.rank_tails: dict[Path, LineTail] = {}
        self._reset()

    def _reset(self) -> None:
        self.started: dict | None = None
        self.last_step: dict | None = None
        self.last_eval: dict | None = None
        self.last_checkpoint: str | None = None
        self.last_checkpoint_step = -1
        self.ended: str | None = None  # "finished" or "interrupted", until a later session starts
        self.curves = {name: Series(self.capacity) for name in CURVES}
        self.events: deque[dict] = deque(maxlen=self.events_kept)
        self.samples: list[dict] = []  # the latest step's generations
        self.ranks: dict[int, RankRow] = {}

    @property
    def name(self) -> str:
        return (self.started or {}).get("name") or self.run_dir.name

    @property
    def total_steps(self) -> int | None:
        return (self.started or {}).get("steps")

    @property
    def step(self) -> int:
        steps = [r["step"] for r in (self.last_step, self.last_eval, self.started) if r is not None]
        return max(steps, default=0)

    @property
    def best_val_loss(self) -> float | None:
        values = [v for v in self.curves["val_loss"].values if math.isfinite(v)]
        return min(values) if values else None

    def poll(self) -> bool:
        """Take in what was appended since the last poll; True when anything changed."""
        records, restarted = self.tail.read()
        if restarted:
            self._reset()
        for record in records:
            self._apply(record)
        changed = bool(records) or restarted
        return self._poll_ranks() or changed

    def read_all(self) -> RunLog:
        while self.poll():
            pass
        return self

    def _apply(self, record: dict) -> None:
        kind, step = record.get("event"), record.get("step", 0)
        if not isinstance(step, int):
            return
        if kind == "started":
            self.started, self.ended = record, None
        elif kind == "resumed":
            for series in self.curves.values():
                series.drop_after(step)
        elif kind == "step":
            self.last_step = record
            for name in CURVES:
                value = record.get(name)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.curves[name].add(step, float(value))
        elif kind == "eval":
            self.last_eval = record
            if isinstance(record.get("val_loss"), int | float):
                self.curves["val_loss"].add(step, float(record["val_loss"]))
        elif kind == "checkpoint":
            self.last_checkpoint, self.last_checkpoint_step = record.get("path"), step
        elif kind == "sample":
            if self.samples and self.samples[-1].get("step") != step:
                self.samples = []
            self.samples.append(record)
        if kind in ("finished", "interrupted"):
            self.ended = kind
        if kind in EVENT_KINDS:
            self.events.append(record)

    def _poll_ranks(self) -> bool:
        """Each rank's newest record; only the ranks of the current session's world are shown."""
        directory = self.run_dir / RANKS_DIR
        if not directory.is_dir():
            return False
        changed = False
        for path in directory.glob("rank-*.jsonl"):
            tail = self.rank_tails.setdefault(path, LineTail(path))
            records, _ = tail.read()
            for record in records:
                if record.get("event") == "rank" and isinstance(record.get("rank"), int):
                    self.ranks[record["rank"]] = RankRow(
                        record["rank"],
                        record.get("step", 0),
                        float(record.get("tokens_per_second", math.nan)),
                        float(record.get("memory_bytes", math.nan)),
                        tail.modified,
                    )
                    changed = True
        world = (self.started or {}).get("world_size")
        if world:
            self.ranks = {rank: row for rank, row in self.ranks.items() if rank < world}
        return changed

    def status(self, now: float | None = None) -> str:
        """finished, interrupted, running, stalled (no record for STALLED_SECONDS, no end), or waiting."""
        if self.ended:
            return self.ended
        if self.started is None:
            return "waiting"
        if self.total_steps and self.last_checkpoint_step >= self.total_steps:
            return "finished"  # a run written before `finished` records existed
        now = time.time() if now is None else now
        return "stalled" if now - self.tail.modified > STALLED_SECONDS else "running"

    def age_seconds(self, now: float | None = None) -> float | None:
        """Seconds since the metrics file last changed."""
        if not self.tail.modified:
            return None
        return (time.time() if now is None else now) - self.tail.modified

    def eta_seconds(self) -> float | None:
        """Time left at the latest measured throughput."""
        if self.started is None or self.last_step is None or self.ended:
            return None
        tokens_per_step = self.started.get("global_batch_size", 0) * self.started.get("seq_len", 0)
        speed = self.last_step.get("tokens_per_second") or 0
        remaining = (self.total_steps or 0) - self.last_step["step"]
        if not speed or not tokens_per_step or remaining < 0:
            return None
        return remaining * tokens_per_step / speed


def find_runs(roots: list[Path]) -> list[Path]:
    """Run directories (those with a metrics.jsonl) at or under each root, in order, each once. The walk
    stops at a run directory and skips hidden folders, so checkpoints and corpora are not searched."""
    found: list[Path] = []
    for root in roots:
        for directory, subdirectories, files in os.walk(root):
            if METRICS_FILE in files:
                subdirectories.clear()
                if Path(directory) not in found:
                    found.append(Path(directory))
            else:
                subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
    return found


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def format_bytes(size: float | None) -> str:
    if size is None or not math.isfinite(size):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.2f} {unit}"
        size /= 1024
    return "-"


def summary(log: RunLog) -> dict[str, str]:
    """The run's latest numbers, labelled: the monitor's summary and the report's final-metrics table."""
    step, evaluated = log.last_step or {}, log.last_eval or {}
    total = log.total_steps

    def number(record: dict, key: str, spec: str, scale: float = 1.0, suffix: str = "") -> str:
        value = record.get(key)
        return f"{value * scale:{spec}}{suffix}" if isinstance(value, int | float) else "-"

    best = log.best_val_loss
    return {
        "status": log.status(),
        "step": f"{log.step}/{total}" if total else str(log.step),
        "train loss": number(step, "loss", ".4f"),
        "val loss": number(evaluated, "val_loss", ".4f"),
        "val perplexity": number(evaluated, "val_ppl", ".2f"),
        "best val loss": f"{best:.4f}" if best is not None else "-",
        "lr": number(step, "lr", ".2e"),
        "grad norm": number(step, "grad_norm", ".3f"),
        "tokens/s": number(step, "tokens_per_second", ",.0f"),
        "MFU": number(step, "mfu", ".1f", 100, "%"),
        "memory": format_bytes(step.get("memory_bytes")),
        "elapsed": format_duration(step.get("elapsed_seconds")),
        "ETA": format_duration(log.eta_seconds()),
        "last checkpoint": log.last_checkpoint or "-",
    }
