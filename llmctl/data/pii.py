"""Opt-in PII scrubbing: e-mail addresses, phone numbers, IP addresses and card numbers -> typed placeholders."""

from __future__ import annotations

import re
from collections import Counter

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD = re.compile(r"\b\d(?:[ -]?\d){12,18}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
PHONE = re.compile(
    r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,3}(?![\w.])"
)
MIN_PHONE_DIGITS = 9


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def scrub_pii(text: str) -> tuple[str, Counter]:
    """Replace PII with `<EMAIL>`, `<CREDIT_CARD>`, `<IP_ADDRESS>`, `<PHONE>`; count each kind replaced."""
    counts: Counter = Counter()

    def replace(kind: str, accept=lambda match: True):
        def substitute(match: re.Match) -> str:
            if not accept(match):
                return match.group(0)
            counts[kind] += 1
            return f"<{kind}>"

        return substitute

    text = EMAIL.sub(replace("EMAIL"), text)
    text = CARD.sub(replace("CREDIT_CARD", lambda m: luhn_valid(re.sub(r"\D", "", m.group(0)))), text)
    text = IPV4.sub(replace("IP_ADDRESS"), text)
    text = IPV6.sub(replace("IP_ADDRESS"), text)
    text = PHONE.sub(
        replace("PHONE", lambda m: sum(c.isdigit() for c in m.group(0)) >= MIN_PHONE_DIGITS), text
    )
    return text, counts
