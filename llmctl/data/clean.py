"""Text cleaning: mojibake repair, Unicode normalisation, control characters and whitespace."""

from __future__ import annotations

import re

import ftfy

# C0/C1 controls except tab and newline, plus zero-width and BOM characters that only confuse tokenizers.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
TRAILING_SPACE = re.compile(r"[ \t]+\n")
BLANK_RUNS = re.compile(r"\n{3,}")
FTFY_CONFIG = ftfy.TextFixerConfig(normalization="NFC", explain=False)


def clean_text(text: str) -> str:
    text = ftfy.fix_text(text, config=FTFY_CONFIG)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = CONTROL.sub("", text)
    text = text.replace("\u00a0", " ")
    text = TRAILING_SPACE.sub("\n", text)
    text = BLANK_RUNS.sub("\n\n", text)
    return text.strip()
