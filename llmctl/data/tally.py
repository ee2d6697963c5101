"""What a corpus build counts for its manifest: every input read, skipped (and why), filtered (by which rule),
duplicate, cleaned and kept. The tasks of a distributed build each keep one, and the tallies add up."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from llmctl.data.documents import SourceProblem

MAX_REPORTED_PROBLEMS = 100


@dataclass
class CorpusTally:
    documents_read: int = 0
    input_bytes: int = 0
    skipped_inputs: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    problems: list[dict] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    cleaned: Counter = field(default_factory=Counter)  # characters changed, per cleaning rule
    pii: Counter = field(default_factory=Counter)  # replacements in kept documents
    per_source: Counter = field(default_factory=Counter)  # kept documents

    def problem(self, item: SourceProblem) -> None:
        self.skipped_inputs += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append({"location": item.location, "reason": item.reason})

    def read(self, input_bytes: int, cleaned: Counter, rejected_by: str | None) -> bool:
        """Count a processed document; whether it passed the filters."""
        self.documents_read += 1
        self.input_bytes += input_bytes
        self.cleaned.update(cleaned)
        if rejected_by is not None:
            self.filtered[rejected_by] += 1
        return rejected_by is None

    def kept(self, source: str, pii: Counter) -> None:
        self.pii.update(pii)
        self.per_source[source] += 1

    def add(self, other: CorpusTally) -> None:
        for name in (
            "documents_read",
            "input_bytes",
            "skipped_inputs",
            "exact_duplicates",
            "near_duplicates",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems = (self.problems + other.problems)[:MAX_REPORTED_PROBLEMS]
        for name in ("filtered", "cleaned", "pii", "per_source"):
            getattr(self, name).update(getattr(other, name))

    def to_json(self) -> dict:
        """Plain values (dataclasses.asdict would rebuild each Counter from its (key, count) pairs)."""
        return {
            name: dict(value) if isinstance(value, Counter) else value for name, value in vars(self).items()
        }

    @classmethod
    def from_json(cls, values: dict) -> CorpusTally:
        counters = {name: Counter(values[name]) for name in ("filtered", "cleaned", "pii", "per_source")}
        return cls(**{**values, **counters})
