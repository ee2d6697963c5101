"""What `llmctl up` is asked for, what it reports as it goes, and the checks a request passes before any work
starts: every problem a user can fix is one line, and nothing is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmctl.checkpoint import checkpoint_problem
from llmctl.data.sources import expand_sources
from llmctl.errors import UserError
from llmctl.model.hf_format import CONFIG_FILE
from llmctl.pipeline.settings import UpSettings
from llmctl.registry.reference import check_model_name


@dataclass(frozen=True)
class UpRequest:
    docs: Path
    out: Path
    budget_seconds: float
    name: str
    base: Path | None = (
        None  # a model directory or a GGUF file; registry references are resolved by the caller
    )
    base_label: str | None = None  # how the user named the base, for the model card
    settings: UpSettings = UpSettings()


@dataclass(frozen=True)
class StageStarted:
    name: str
    what: str


@dataclass(frozen=True)
class StageDone:
    name: str
    seconds: float
    summary: str
    reused: bool


@dataclass
class UpResult:
    model: Path
    registered: str
    card: Path
    report: Path
    evaluation: list[tuple[str, dict]]
    stages: list[StageDone] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """A signal stopped a training stage after its checkpoint; running `llmctl up` again resumes it."""


def check_request(request: UpRequest) -> tuple[list[Path], int]:
    """The documents to read and their bytes, or the first problem with the request."""
    docs, out = Path(request.docs), Path(request.out)
    check_model_name(request.name)
    if not docs.is_dir():
        raise UserError(f"{docs} is not a folder; give the folder of documents to build the model from")
    if out.resolve() == docs.resolve() or docs.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the documents {docs}; write it elsewhere (default runs/NAME)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    if not any(path.is_file() for path in docs.rglob("*")):
        raise UserError(f"{docs} holds no files; put the documents to learn from in it")
    documents, _ = expand_sources([str(docs)])
    size = sum(path.stat().st_size for path in documents)
    if size == 0:
        raise UserError(f"every readable file in {docs} is empty")
    if request.base is not None:
        check_base(Path(request.base))
    return documents, size


def check_base(base: Path) -> None:
    if is_gguf(base):
        gguf_parameters(base)
        return
    if not base.exists():
        raise UserError(f"--base {base} does not exist; give a model directory, a .gguf file or NAME@ALIAS")
    problem = checkpoint_problem(base) if base.is_dir() else "it is a file but not a .gguf model"
    if problem or not (base / CONFIG_FILE).is_file():
        raise UserError(f"--base {base} is not a model: {problem or 'it has no ' + CONFIG_FILE}")


def is_gguf(path: Path | None) -> bool:
    return path is not None and Path(path).is_file() and Path(path).suffix == ".gguf"


def gguf_parameters(path: Path) -> int:
    """The weights a GGUF file holds, read from its header (the file is memory-mapped, not loaded)."""
    from llmctl.errors import require_extra

    gguf = require_extra("gguf", "export", "reading GGUF files")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as error:
        raise UserError(f"--base {path} is not a GGUF model llmctl can read: {error}") from None
    return sum(int(tensor.n_elements) for tensor in reader.tensors)
