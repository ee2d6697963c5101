"""Suites: a TOML file listing evaluation tasks (perplexity sets, lm-eval tasks, generation tasks), and the
built-in `domain` suite built from a corpus's held-out split."""

from __future__ import annotations

import json
import random
import re
import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmctl.atomic import atomic_directory
from llmctl.checkpoint import RECIPE_FILE
from llmctl.data.corpus import iter_texts
from llmctl.data.instructions import heading_sections
from llmctl.errors import UserError
from llmctl.recipe import describe_errors, load_recipe

SUITE_FILE = "suite.toml"
SENTENCE = re.compile(r"(?<=[.!?])\s+")


class Task(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    type: Literal["perplexity", "lm_eval", "generation"]
    data: str | None = Field(None, description="perplexity: corpus dir, .jsonl or .txt; generation: .jsonl")
    tasks: list[str] = Field(default_factory=list, description="lm_eval: task names")
    include_path: str | None = None
    limit: int | None = None
    max_tokens: int = 32


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    tasks: list[Task] = Field(min_length=1)


def load_suite(path: Path) -> Suite:
    if not path.is_file():
        raise UserError(f"suite file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
        suite = Suite.model_validate(raw)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{path}: invalid TOML: {error}") from None
    except ValidationError as error:
        raise UserError(f"{path}: {describe_errors(error)}") from None
    for task in suite.tasks:  # relative data paths are relative to the suite file
        for key in ("data", "include_path"):
            value = getattr(task, key)
            if value and not Path(value).is_absolute():
                setattr(task, key, str((path.parent / value).resolve()))
    return suite


def cloze_items(texts: list[str], count: int, rng: random.Random) -> list[dict]:
    """Sentences whose last word is to be picked among 4 (three distractors from other sentences)."""
    sentences = [s.strip() for text in texts for s in SENTENCE.split(text.replace("\n", " "))]
    usable = []
    for sentence in sentences:
        words = sentence.rstrip(".!?").split()
        if 8 <= len(words) <= 40 and words[-1].isalpha():
            usable.append((" ".join(words[:-1]), words[-1]))
    rng.shuffle(usable)
    answers = sorted({answer for _, answer in usable})
    items = []
    for context, answer in usable[:count]:
        distractors = rng.sample([a for a in answers if a != answer], 3) if len(answers) > 3 else []
        if len(distractors) < 3:
            break
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def heading_items(texts: list[str], count: int, rng: random.Random) -> list[dict]:
    """(section heading -> the section's first sentence): a short line followed by a paragraph."""
    items = []
    for text in texts:
        for heading, body in heading_sections(text):
            first = SENTENCE.split(body.replace("\n", " "))[0]
            if 20 <= len(first) <= 200:
                items.append({"prompt": heading + "\n\n", "reference": first})
    rng.shuffle(items)
    return items[:count]


def build_domain_suite(corpus: Path, out: Path, seed: int = 0, cloze: int = 200, headings: int = 50) -> Path:
    """Write the domain suite's data and suite.toml from the corpus's held-out split; returns the file."""
    texts = list(iter_texts(corpus, "val"))
    if not texts:
        raise UserError(f"{corpus} has an empty validation split; rebuild it with a larger --val-fraction")
    rng = random.Random(seed)
    cloze_rows, heading_rows = cloze_items(texts, cloze, rng), heading_items(texts, headings, rng)
    tasks: list[dict] = [{"name": "heldout", "type": "perplexity", "data": str(Path(corpus).resolve())}]
    with atomic_directory(out) as staging:
        # a task with no items would fail the whole suite at evaluation time, so it is left out
        if cloze_rows:
            (staging / "cloze.jsonl").write_text("".join(json.dumps(row) + "\n" for row in cloze_rows))
            # lm-eval's loader takes absolute data paths: move the suite folder and rebuild it
            (staging / "domain_cloze.yaml").write_text(cloze_task_yaml(out.resolve() / "cloze.jsonl"))
            tasks.append({"name": "cloze", "type": "lm_eval", "tasks": ["domain_cloze"], "include_path": "."})
        if heading_rows:
            (staging / "headings.jsonl").write_text("".join(json.dumps(row) + "\n" for row in heading_rows))
            tasks.append(
                {"name": "headings", "type": "generation", "data": "headings.jsonl", "max_tokens": 32}
            )
        (staging / SUITE_FILE).write_text(tomli_w.dumps({"name": "domain", "tasks": tasks}))
    return out / SUITE_FILE


def cloze_task_yaml(data_file: Path) -> str:
    return (
        "task: domain_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def domain_suite_for(checkpoint: Path, data: Path | None) -> Path:
    """The domain suite file for `eval --suite domain`: `data` may be a built suite folder or a corpus (its
    suite built beside it once); with neither, the corpus named in the checkpoint's recipe."""
    if data and (data / SUITE_FILE).is_file():
        return data / SUITE_FILE
    corpus = data
    if corpus is None:
        if not (checkpoint / RECIPE_FILE).is_file():
            raise UserError(f"{checkpoint} records no recipe, so its corpus is unknown; pass --data CORPUS")
        named = load_recipe(checkpoint / RECIPE_FILE).data.corpus
        if not named:
            raise UserError(f"the recipe of {checkpoint} names no data.corpus; pass --data CORPUS")
        corpus = Path(named)
    suite_dir = corpus.parent / f"{corpus.name}-domain-suite"
    if not (suite_dir / SUITE_FILE).is_file():
        build_domain_suite(corpus, suite_dir)
    return suite_dir / SUITE_FILE
