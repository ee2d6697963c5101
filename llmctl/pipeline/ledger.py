"""Which stages of an `llmctl up` output directory are done, and for which inputs: each stage's record holds
the digest of its inputs and settings (its key), so a re-run reuses a stage whose key is unchanged and redoes
one whose inputs changed, and everything after it, since each key includes the keys before it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.atomic import atomic_write_text
from llmctl.digests import file_sha256
from llmctl.errors import UserError

LEDGER_FILE = "up.json"


def settings_key(*parts: object) -> str:
    """A digest of JSON-serialisable settings and upstream keys, in order."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def documents_digest(files: list[Path], root: Path) -> str:
    """One digest of the documents: each one's path under `root` and its content. Adding, removing, renaming
    or editing a document changes it; touching one does not."""
    lines = [f"{file_sha256(path)}  {path.relative_to(root).as_posix()}" for path in sorted(files)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@dataclass
class StageRecord:
    key: str
    done: bool = False
    seconds: float = 0.0
    result: dict = field(default_factory=dict)


class Ledger:
    """`up.json` in the output directory, rewritten atomically whenever a stage starts or ends."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LEDGER_FILE
        self.records: dict[str, StageRecord] = {}
        if self.path.is_file():
            try:
                raw = json.loads(self.path.read_text())
                self.records = {name: StageRecord(**record) for name, record in raw["stages"].items()}
            except (ValueError, KeyError, TypeError) as error:
                raise UserError(
                    f"{self.path} is damaged ({error}); delete it to redo every stage of {self.path.parent}"
                ) from None

    def done(self, stage: str, key: str) -> StageRecord | None:
        """The stage's record when it finished with this key."""
        record = self.records.get(stage)
        return record if record is not None and record.done and record.key == key else None

    def started_with(self, stage: str, key: str) -> bool:
        """Whether an unfinished attempt of the stage used this key (a training run to resume)."""
        record = self.records.get(stage)
        return record is not None and record.key == key

    def start(self, stage: str, key: str) -> None:
        if not self.started_with(stage, key):
            self.records[stage] = StageRecord(key)
        self.records[stage].done = False
        self._write()

    def finish(self, stage: str, seconds: float, result: dict) -> None:
        record = self.records[stage]
        record.done, record.seconds, record.result = True, seconds, result
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stages = {name: vars(record) for name, record in self.records.items()}
        atomic_write_text(self.path, json.dumps({"stages": stages}, indent=2, default=str) + "\n")
