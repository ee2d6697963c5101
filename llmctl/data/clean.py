"""Text cleaning that repairs broken text and leaves valid text alone.

Repairs, on by default: mojibake (text decoded with the wrong codec, "â€™" -> "’"), terminal escape codes,
control characters, line-break conventions, canonical (NFC) composition. Every rewrite of valid text
(straight quotes, half-width forms, ligatures, non-breaking spaces, whitespace runs) is a named rule in the
recipe's `[data.cleaning]` section, off by default: typographic quotes, dashes and full-width CJK punctuation
are what real documents contain, and a model that never saw them pays for them at inference.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Literal

import ftfy
import ftfy.fixes
from pydantic import BaseModel, ConfigDict

# C0/C1 controls except tab and newline, and the byte-order mark: never part of valid running text.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
ZERO_WIDTH = re.compile(r"[\u200b\u200e\u200f\u2060]")
NO_BREAK_SPACES = re.compile(r"[\u00a0\u202f]")
TRAILING_SPACE_BEFORE_NEWLINE = re.compile(r"[ \t]+(?=\n)")
EXTRA_BLANK_LINES = re.compile(r"(?<=\n\n)\n+")
LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")
# ftfy's encoding repairs alone: no HTML unescaping, no quote, width or ligature rewrites, no normalisation
MOJIBAKE_ONLY = ftfy.TextFixerConfig(
    unescape_html=False,
    remove_terminal_escapes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    uncurl_quotes=False,
    fix_line_breaks=False,
    remove_control_chars=False,
    normalization=None,
    explain=False,
)


class CleaningRules(BaseModel):
    """How `corpus build` cleans each document; the manifest counts the characters each rule changed."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # repairs of broken text
    fix_mojibake: bool = True  # wrong-codec text, lossy sequences, C1 controls that were Windows-1252
    remove_terminal_escapes: bool = True  # ANSI colour and cursor codes from captured terminal output
    fix_line_breaks: bool = True  # \r\n, \r, U+2028, U+2029 and U+0085 become \n
    remove_control_chars: bool = True  # C0/C1 controls other than tab and newline, byte-order marks
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"  # NFC: canonically equivalent text, composed
    # blank lines before and whitespace after the text (an eos separates documents)
    trim_document: bool = True
    # rewrites of valid text, off unless asked for
    unescape_html: bool = False  # "&amp;" -> "&" (wrong for documents that quote HTML or code)
    uncurl_quotes: bool = False  # ‘ ’ “ ” -> ' "
    fix_character_width: bool = False  # full-width forms (，。！ＡＢ) -> ASCII
    fix_latin_ligatures: bool = False  # ﬁ -> fi
    nbsp_to_space: bool = False  # no-break spaces -> plain spaces
    remove_zero_width: bool = False  # zero-width space, direction marks, word joiner
    strip_trailing_spaces: bool = False  # spaces at line ends (Markdown uses two for a line break)
    collapse_blank_lines: bool = False  # three or more newlines -> two


Step = Callable[[str], tuple[str, int]]  # text -> (cleaned text, characters changed)


def _measured(fix: Callable[[str], str]) -> Step:
    def step(text: str) -> tuple[str, int]:
        cleaned = fix(text)
        return cleaned, (changed_characters(text, cleaned) if cleaned != text else 0)

    return step


def _substitution(pattern: re.Pattern, replacement: str) -> Step:
    """A regex rule that counts exactly the characters it matched."""

    def step(text: str) -> tuple[str, int]:
        matched = 0

        def replace(match: re.Match) -> str:
            nonlocal matched
            matched += len(match.group())
            return replacement

        return pattern.sub(replace, text), matched

    return step


def cleaning_steps(rules: CleaningRules) -> list[tuple[str, Step]]:
    """The enabled rules, in the order they run (repairs first: a rewrite must see repaired text)."""
    form = rules.normalization
    candidates: list[tuple[str, bool, Step]] = [
        (
            "fix_mojibake",
            rules.fix_mojibake,
            _measured(lambda text: ftfy.fix_text(text, config=MOJIBAKE_ONLY)),
        ),
        ("remove_terminal_escapes", rules.remove_terminal_escapes, _substitution(ftfy.fixes.ANSI_RE, "")),
        ("fix_line_breaks", rules.fix_line_breaks, _measured(ftfy.fixes.fix_line_breaks)),
        ("remove_control_chars", rules.remove_control_chars, _substitution(CONTROL, "")),
        ("normalization", form != "none", _measured(lambda text: unicodedata.normalize(form, text))),
        ("unescape_html", rules.unescape_html, _measured(ftfy.fixes.unescape_html)),
        ("uncurl_quotes", rules.uncurl_quotes, _measured(ftfy.fixes.uncurl_quotes)),
        ("fix_character_width", rules.fix_character_width, _measured(ftfy.fixes.fix_character_width)),
        ("fix_latin_ligatures", rules.fix_latin_ligatures, _measured(ftfy.fixes.fix_latin_ligatures)),
        ("nbsp_to_space", rules.nbsp_to_space, _substitution(NO_BREAK_SPACES, " ")),
        ("remove_zero_width", rules.remove_zero_width, _substitution(ZERO_WIDTH, "")),
        (
            "strip_trailing_spaces",
            rules.strip_trailing_spaces,
            _substitution(TRAILING_SPACE_BEFORE_NEWLINE, ""),
        ),
        ("collapse_blank_lines", rules.collapse_blank_lines, _substitution(EXTRA_BLANK_LINES, "")),
        (
            "trim_document",
            rules.trim_document,
            _measured(lambda text: LEADING_BLANK_LINES.sub("", text).rstrip()),
        ),
    ]
    return [(name, step) for name, enabled, step in candidates if enabled]


def clean_text(text: str, rules: CleaningRules | None = None) -> tuple[str, Counter]:
    """The cleaned text and, per rule, how many characters it changed."""
    changed: Counter = Counter()
    for name, step in cleaning_steps(rules or CleaningRules()):
        text, count = step(text)
        if count:
            changed[name] += count
    return text, changed


def changed_characters(before: str, after: str) -> int:
    """Characters replaced, removed or inserted: exact for same-length rewrites and for one changed span;
    for length-changing rewrites spread through a text, the span from the first to the last change."""
    if len(before) == len(after):
        return sum(a != b for a, b in zip(before, after, strict=True))
    prefix = 0
    limit = min(len(before), len(after))
    while prefix < limit and before[prefix] == after[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and before[-1 - suffix] == after[-1 - suffix]:
        suffix += 1
    return max(len(before), len(after)) - prefix - suffix
