"""Held-out general English text, for measuring how much a learner disturbs the base model's
language modelling outside the stream (e.g. perplexity drift).

The passages come from the Python standard library (`pydoc_data.topics`, the prose of the
language reference), so they need no download and never appear in a stream.
"""

from __future__ import annotations

import random
import re

_SENTENCE_END = re.compile(r"[.!?](?=\s+[A-Z\"'(])")


def _prose_paragraphs(doc: str) -> list[str]:
    """The prose paragraphs of one topic: no headings, no indented code or grammar, no tables."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if not para.strip() or any(ln.startswith(" ") for ln in lines if ln.strip()):
            continue  # code sample, grammar production or indented list
        if len(lines) > 1 and re.fullmatch(r"[*=\-~^+]{3,}", lines[-1].strip()):
            continue  # a heading with its underline
        text = re.sub(r"\s+", " ", para).strip()
        if len(text) < 80 or not text[0].isupper() or not re.search(r"[.!?]$", text):
            continue  # fragment, or a paragraph ending in ':' that introduces code
        symbols = sum(not (c.isalnum() or c.isspace() or c in ".,;:'\"()-") for c in text)
        if symbols / len(text) > 0.03:
            continue  # code-heavy prose ("x[i] = y" ...)
        out.append(text)
    return out


def _clip(text: str, lo: int, hi: int) -> str | None:
    """`text` cut at the last sentence end within [lo, hi] characters, or None if there is none."""
    if len(text) <= hi and re.search(r"[.!?]$", text) and len(text) >= lo:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if lo <= m.end() <= hi]
    return text[: ends[-1]] if ends else None


def general_text(n: int = 16, min_chars: int = 400, seed: int = 0) -> list[str]:
    """`n` distinct English passages of about `min_chars`..2*`min_chars` characters, each cut at a
    sentence end; deterministic in (n, min_chars, seed) for a given Python version."""
    from pydoc_data.topics import topics

    if n < 0 or min_chars < 1:
        raise ValueError(f"need n >= 0 and min_chars >= 1, got n={n}, min_chars={min_chars}")
    passages = []
    for key in sorted(topics):
        body = " ".join(_prose_paragraphs(topics[key]))
        clipped = _clip(body, min_chars, 2 * min_chars) if body else None
        if clipped:
            passages.append(clipped)
    if n > len(passages):
        raise ValueError(f"asked for {n} passages of >= {min_chars} characters, only {len(passages)} available")
    rng = random.Random(seed)
    return rng.sample(passages, n)
