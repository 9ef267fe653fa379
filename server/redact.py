"""Masking of personal data in text that --log-requests writes: e-mail addresses, phone numbers, ID numbers."""
import re

_PATTERNS = [
    (re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[email]"),
    # ID-card-like: US SSN, and letters followed by 6+ digits (passports, national IDs), and long digit runs
    (re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[id]"),
    (re.compile(r"\b[A-Z]{1,3}\d{6,}[A-Z\d]?\b"), "[id]"),
    (re.compile(r"\b\d{15,18}[\dXx]\b"), "[id]"),
    # phone numbers: an optional +country code, then digits with spaces, dots, dashes or brackets between;
    # 9 digits at least, so that dates (2026-11-24) and times stay
    (re.compile(r"(?<![\w])\+?\(?\d[\d\s().-]{6,}\d(?![\w])"),
     lambda m: "[phone]" if sum(c.isdigit() for c in m.group()) >= 9 else m.group()),
]


def mask_pii(text: str) -> str:
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text
