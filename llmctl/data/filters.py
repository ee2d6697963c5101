"""Document quality filters and their thresholds. Each check names the rule a document breaks, so the build
can count them. The rules are the recipe's `[data.filters]` section; this module imports neither the recipe
nor torch."""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel, ConfigDict, Field

NGRAM = 5


class FilterRules(BaseModel):
    """Thresholds a document must meet to be kept; 0 (or 1 for fractions) switches a rule off."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    min_chars: int = Field(200, ge=0)
    max_chars: int = Field(1_000_000, gt=0)
    min_alpha_fraction: float = Field(0.5, ge=0, le=1)
    max_repeated_line_fraction: float = Field(0.3, ge=0, le=1)
    max_repeated_ngram_fraction: float = Field(0.3, ge=0, le=1)
    language: str | None = None


def alpha_fraction(text: str) -> float:
    visible = [char for char in text if not char.isspace()]
    return sum(char.isalpha() for char in visible) / len(visible) if visible else 0.0


def repeated_line_fraction(text: str) -> float:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    return 1 - len(set(lines)) / len(lines) if lines else 0.0


def repeated_ngram_fraction(text: str, n: int = NGRAM) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (boilerplate, spam, loops)."""
    words = text.split()
    if len(words) < n:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    return (total - len(counts)) / total


def failed_filter(text: str, rules: FilterRules) -> str | None:
    """The first rule the text breaks, cheapest checks first; None when it passes every rule."""
    if len(text) < rules.min_chars:
        return "too_short"
    if len(text) > rules.max_chars:
        return "too_long"
    if alpha_fraction(text) < rules.min_alpha_fraction:
        return "low_alpha_fraction"
    if repeated_line_fraction(text) > rules.max_repeated_line_fraction:
        return "repeated_lines"
    if repeated_ngram_fraction(text) > rules.max_repeated_ngram_fraction:
        return "repeated_ngrams"
    if rules.language is not None and detect_language(text) != rules.language:
        return "wrong_language"
    return None


def detect_language(text: str) -> str:
    from llmctl.errors import UserError

    try:
        import py3langid
    except ImportError:
        raise UserError("the language filter needs py3langid: pip install 'llmctl[lang]'") from None
    return py3langid.classify(text[:5000])[0]
