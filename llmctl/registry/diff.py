"""Two registered versions side by side: their lineage, the recipe keys that differ, and every attached
metric with its change (what `llmctl models diff` shows)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmctl.registry.lineage import recipe_keys
from llmctl.registry.store import ModelVersion

LINEAGE_KEYS = (
    "kind",
    "weights_sha256",
    "files_sha256",
    "tokenizer_sha256",
    "corpus_manifest_sha256",
    "parent_version",
    "quantization",
)


@dataclass(frozen=True)
class Row:
    key: str
    left: str
    right: str

    @property
    def differs(self) -> bool:
        return self.left != self.right


@dataclass(frozen=True)
class MetricRow:
    key: str
    left: float | None
    right: float | None

    @property
    def change(self) -> float | None:
        return None if self.left is None or self.right is None else self.right - self.left


@dataclass
class VersionDiff:
    lineage: list[Row] = field(default_factory=list)  # digests shortened to 12 characters
    recipe: list[Row] = field(default_factory=list)  # one "recipe" row where either version recorded none
    metrics: list[MetricRow] = field(default_factory=list)


def diff_versions(a: ModelVersion, b: ModelVersion, all_keys: bool = False) -> VersionDiff:
    """The rows that tell `a` and `b` apart; with `all_keys`, the recipe keys they share too."""
    diff = VersionDiff()
    for key in LINEAGE_KEYS:
        left, right = a.lineage(key) or "", b.lineage(key) or ""
        if left or right:
            short = 12 if key.endswith("sha256") else None
            diff.lineage.append(Row(key, left[:short], right[:short]))
    recipe_a, recipe_b = recipe_keys(a.lineage("recipe")), recipe_keys(b.lineage("recipe"))
    if (
        not recipe_a or not recipe_b
    ):  # a quantized or downloaded model records no recipe: one row, not every key
        diff.recipe.append(Row("recipe", "recorded" if recipe_a else "—", "recorded" if recipe_b else "—"))
    else:
        for key in sorted(set(recipe_a) | set(recipe_b)):
            row = Row(key, recipe_a.get(key, "—"), recipe_b.get(key, "—"))
            if row.differs or all_keys:
                diff.recipe.append(row)
    metrics_a, metrics_b = version_metrics(a), version_metrics(b)
    for key in sorted(set(metrics_a) | set(metrics_b)):
        diff.metrics.append(MetricRow(key, metrics_a.get(key), metrics_b.get(key)))
    return diff


def version_metrics(version: ModelVersion) -> dict[str, float]:
    """Every attached evaluation's metrics, as "label: metric" -> value."""
    return {
        f"{label}: {metric}": number
        for label, attached in version.evals().items()
        for metric, number in attached["metrics"].items()
    }
