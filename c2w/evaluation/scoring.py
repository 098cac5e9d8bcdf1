"""Probe scoring by real greedy decoding.

A probe is correct when its normalised answer appears as whole words in the first non-empty line of
the greedy continuation, cut at the answer's length plus `slack` tokens. We also report strict
prefix match (the continuation, after leading spaces only, starts with the answer) and the
teacher-forced mean log-probability of the answer, a continuous signal that moves before accuracy.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from c2w.fast import decode_and_logprobs, greedy_decode

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}‘’“”–—…]")
# punctuation that is part of a number, kept as it is before the rest goes: a decimal point or comma
# between digits ("3.5" is not "3", "1,5" not "15"), and a minus sign at a number's start ("-5" is not
# "5"; U+2212 becomes "-"). A comma before exactly three digits groups thousands: dropped ("2,500" is
# "2500"). A hyphen between digits ("1990-1995") is a range: it still splits
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER_MARK = re.compile(r"(?<=\d)[.,](?=\d)|(?<![\w.,-])-(?=\d)")
_KEEP = "\x00"  # a placeholder for a kept mark, outside every punctuation class


def _cjk(c: str) -> bool:
    # CJK ideographs and kana: written without spaces between words, so each counts as a word
    o = ord(c)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF \
        or 0x20000 <= o <= 0x2FA1F


def normalise(s: str) -> str:
    """Lower case, punctuation (ASCII, and every Unicode punctuation mark: 。،«» ...) to spaces, except
    the marks that belong to a number (`_NUMBER_MARK`), each CJK character spaced as a word of its own,
    whitespace collapsed."""
    s = unicodedata.normalize("NFKC", s).lower().replace("\u2212", "-").replace(_KEEP, " ")
    s = _THOUSANDS.sub("", s)
    marks = [m.group() for m in _NUMBER_MARK.finditer(s)]
    s = _PUNCT.sub(" ", _NUMBER_MARK.sub(_KEEP, s))
    if not s.isascii():
        s = "".join(" " if unicodedata.category(c)[0] == "P" else f" {c} " if _cjk(c) else c for c in s)
    if marks:
        it = iter(marks)
        s = re.sub(_KEEP, lambda _: next(it), s)
    return " ".join(s.split())


def first_line(s: str) -> str:
    for line in s.splitlines():
        if line.strip():
            return line
    return ""


def contains_words(haystack: str, needle: str) -> bool:
    n = normalise(needle)
    return bool(n) and f" {n} " in f" {normalise(haystack)} "


def is_correct(continuation: str, answer: str) -> bool:
    """The lenient-but-honest rule: answer as whole words in the first non-empty line."""
    return contains_words(first_line(continuation), answer)


def is_strict(continuation: str, answer: str) -> bool:
    """Strict prefix: a blank line or any preamble ("The answer is") before the answer fails."""
    head = normalise(continuation.lstrip(" \t"))
    if continuation.lstrip(" \t")[:1] in ("\n", "\r"):
        return False
    n = normalise(answer)
    return bool(n) and (head == n or head.startswith(n + " "))


@dataclass(frozen=True)
class ProbeScore:
    continuation: str
    correct: bool
    strict: bool
    logprob: float


def format_prompts(tokenizer, prompts: list[str], probe_format: str) -> list[str]:
    """`raw`: the prompt as is. `chat`: the prompt as one user turn through the chat template."""
    if probe_format == "raw":
        return list(prompts)
    if probe_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--probe-format chat needs a tokenizer with a chat template")
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    raise ValueError(f"probe format must be 'raw' or 'chat', got {probe_format!r}")


def score_probes(model, tokenizer, prompts: list[str], answers: list[str], *, slack: int = 4,
                 batch_size: int = 32, with_logprob: bool = True) -> list[ProbeScore]:
    """Score already-formatted prompts against their answers."""
    n_ans = [len(tokenizer(" " + a, add_special_tokens=False).input_ids) for a in answers]
    limits = [n + slack for n in n_ans]
    if with_logprob:  # one shared prompt prefill serves both the decode and the answer log-probs
        ids, lps = decode_and_logprobs(model, tokenizer, prompts, answers, limits, batch_size=batch_size)
    else:
        ids, lps = greedy_decode(model, tokenizer, prompts, limits, batch_size=batch_size), [float("nan")] * len(prompts)
    conts = [tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    return [ProbeScore(c, is_correct(c, a), is_strict(c, a), lp) for c, a, lp in zip(conts, answers, lps)]
