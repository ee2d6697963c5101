"""A/B serving: sticky assignment of a user to one variant of a weighted alias, and the log of served
completions and their feedback that `llmctl ab report` reads."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmctl.append_log import open_append_log, parse_record

REMEMBERED_COMPLETIONS = 100_000  # the newest completions that accept feedback
RATINGS_PER_COMPLETION = 3  # a client may change its mind; the latest rating counts (evaluate.ab_stats)


def user_digest(user: str) -> str:
    """What the log keeps of a user: enough to count distinct users, never the name itself."""
    return hashlib.sha256(user.encode()).hexdigest()[:16]


def choose_variant(alias: str, variants: list[tuple[str, float]], user: str | None) -> str:
    """A variant of `alias`, drawn by weight. With a user, the draw is a hash of the alias and the user, so
    the user lands on the same variant on every request while the weights stay; without one, a fresh draw."""
    names, weights = zip(*variants, strict=True)
    if user is None:
        return random.choices(names, weights=weights)[0]
    digest = hashlib.sha256(f"{alias}\n{user}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights)
    for name, bound in zip(names, itertools.accumulate(weights), strict=True):
        if point < bound:
            return name
    return names[-1]


@dataclass(frozen=True)
class LoggedRequest:
    """What the log records of a request besides its timings: where it goes, for whom, and its prompt."""

    log: CompletionLog
    alias: str  # the model name the client asked for: a route, or the variant itself
    user: str | None  # user_digest of the client's user, if it named one
    prompt: str


class UnknownCompletion(KeyError):
    """Feedback named a completion id this server has not served (or no longer remembers)."""


class ForeignCompletion(PermissionError):
    """Feedback on a completion served to another user."""


class RatedEnough(RuntimeError):
    """The completion has had its RATINGS_PER_COMPLETION ratings."""


class CompletionLog:
    """Append-only JSONL: a `completion` line per served request, a `feedback` line per score. Each line is
    one write() on an O_APPEND descriptor, so a crash loses at most the line in flight, and readers skip a
    torn line. Prompt and reply text are kept only with `log_prompts`."""

    def __init__(self, path: Path, log_prompts: bool = False) -> None:
        self.path, self.log_prompts = Path(path), log_prompts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # completion id -> (variant, user digest or None), newest last; and ratings given per completion
        self.variants: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.ratings: dict[str, int] = {}
        if self.path.is_file():
            for record in iter_log(self.path):
                if record.get("event") == "completion":
                    self._remember(str(record.get("id")), str(record.get("variant")), record.get("user"))
                elif record.get("event") == "feedback":
                    self.ratings[str(record.get("id"))] = self.ratings.get(str(record.get("id")), 0) + 1
        self.descriptor = open_append_log(self.path)
        self.lock = threading.Lock()

    def _remember(self, completion_id: str, variant: str, user: str | None) -> None:
        self.variants[completion_id] = (variant, user)
        if len(self.variants) > REMEMBERED_COMPLETIONS:
            forgotten, _ = self.variants.popitem(last=False)
            self.ratings.pop(forgotten, None)

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self.lock:
            os.write(self.descriptor, line)

    def completion(self, record: dict, prompt: str | None = None, replies: list[str] | None = None) -> None:
        """Record one served request (its id, alias, variant, user digest, latency, tokens, finish)."""
        if self.log_prompts:
            record = {**record, "prompt": prompt, "replies": replies}
        with self.lock:
            self._remember(record["id"], record["variant"], record.get("user"))
        self._append({"event": "completion", "time": time.time(), **record})

    def feedback(self, completion_id: str, score: float, user: str | None = None) -> str:
        """Record a score in [0, 1] for a served completion, from `user` (a user_digest): only the user it
        was served to rates a completion served to a named user, and at most RATINGS_PER_COMPLETION times.
        Returns its variant."""
        with self.lock:
            known = self.variants.get(completion_id)
            if known is None:
                raise UnknownCompletion(completion_id)
            variant, owner = known
            if owner is not None and owner != user:
                raise ForeignCompletion(completion_id)
            if self.ratings.get(completion_id, 0) >= RATINGS_PER_COMPLETION:
                raise RatedEnough(completion_id)
            self.ratings[completion_id] = self.ratings.get(completion_id, 0) + 1
        self._append(
            {
                "event": "feedback",
                "time": time.time(),
                "id": completion_id,
                "variant": variant,
                "score": score,
            }
        )
        return variant

    def close(self) -> None:
        os.close(self.descriptor)


def iter_log(path: Path) -> Iterator[dict]:
    """Every whole JSON-object line of a completion log, streamed (a torn last line is skipped)."""
    with open(path, "rb") as handle:
        for line in handle:
            record = parse_record(line)
            if record is not None:
                yield record


def read_log(path: Path) -> list[dict]:
    return list(iter_log(path))
