"""The results file `llmctl eval --out` writes, read without loading torch: `eval compare`, `llmctl report`
and `llmctl models attach` use it."""

from __future__ import annotations

import json
from pathlib import Path

from llmctl.errors import UserError


def read_results(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"results file not found: {path}") from None
    except ValueError:  # not JSON, or not UTF-8
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("results"), dict):
        raise UserError(f"{path} is not an `llmctl eval --out` results file")
    return record


def flatten(results: dict) -> dict[tuple[str, str], float]:
    """{(task, metric): value} for numbers, lm-eval's nested task dictionaries included."""
    flat = {}
    for task, metrics in results.items():
        if not isinstance(metrics, dict):
            continue
        for key, value in metrics.items():
            if isinstance(value, dict):
                for inner, number in value.items():
                    if isinstance(number, int | float):
                        flat[(f"{task}/{key}", inner)] = float(number)
            elif isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
                flat.update({(task, f"{key}[{i}]"): float(v) for i, v in enumerate(value)})
            elif isinstance(value, int | float) and not isinstance(value, bool):
                flat[(task, key)] = float(value)
    return flat
