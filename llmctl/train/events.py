"""What the trainer reports, as typed events: the console, the TUI and tests receive these, and
`metrics.jsonl` stores each as a JSON object whose `event` key is the event's `kind`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Event:
    """Something that happened when `step` optimizer steps were done."""

    kind: ClassVar[str]
    step: int

    def __init_subclass__(cls, kind: str = "", **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = kind

    def to_record(self) -> dict:
        return {"event": self.kind, **asdict(self)}


@dataclass(frozen=True)
class Started(Event, kind="started"):
    """The run begins (at step 0) or resumes (at its checkpoint's step)."""

    name: str
    parameters: int
    world_size: int
    device: str
    strategy: str
    precision: str
    steps: int
    global_batch_size: int
    seq_len: int
    run_dir: str
    trainable_parameters: int | None = None  # below `parameters` when only adapters train
    validation_tokens: int | None = (
        None  # held-out tokens scored at each evaluation; 0: none (too few held out)
    )


@dataclass(frozen=True)
class StepLogged(Event, kind="step"):
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float
    memory_bytes: float
    elapsed_seconds: float  # wall-clock time of the run so far, earlier sessions of a resumed run included
    mfu: float | None = None  # of the device's measured (CPU) or rated (GPU) peak


@dataclass(frozen=True)
class StepSkipped(Event, kind="skipped"):
    grad_norm: float  # not finite, so the optimizer step was skipped


@dataclass(frozen=True)
class Evaluated(Event, kind="eval"):
    val_loss: float
    val_ppl: float


@dataclass(frozen=True)
class CheckpointSaved(Event, kind="checkpoint"):
    path: str


@dataclass(frozen=True)
class Resumed(Event, kind="resumed"):
    checkpoint: str


@dataclass(frozen=True)
class CheckpointRejected(Event, kind="checkpoint_rejected"):
    """`--resume auto` passed over a damaged checkpoint, `path`, and resumed at `step` from an earlier one."""

    path: str
    reason: str


@dataclass(frozen=True)
class Interrupted(Event, kind="interrupted"):
    checkpoint: str | None  # saved at this step before stopping


@dataclass(frozen=True)
class TeacherCached(Event, kind="teacher_cache"):
    path: str  # distillation's offline top-k logits, used from here on in place of the teacher
    rows: int
    top_k: int
    build_seconds: float | None  # None when an existing cache was reused


@dataclass(frozen=True)
class Sampled(Event, kind="sample"):
    prompt: str  # one of the recipe's train.sample_prompts
    text: str  # the prompt and what the model as it stands at `step` wrote after it


@dataclass(frozen=True)
class Finished(Event, kind="finished"):
    checkpoint: str | None  # saved at the last step, or when the wall-clock budget was spent
    val_loss: float | None


EventHandler = Callable[[Event], None]
