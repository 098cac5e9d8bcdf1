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
# Numbers keep the marks that are part of them; every other punctuation mark becomes a space:
# - a decimal point: a run of digits with one "." inside ("3.5" is not "3"; ".5" is "0.5");
# - thousands commas ("2,500" and "1,234.5"): dropped, so "2,500" is "2500";
# - any other run of digits joined by "." or "," splits there, as before: lists ("1,2,3"), dates
#   ("12.05.2020"), versions ("3.2.1"), and decimal commas ("0,5": ambiguous with lists);
# - a minus sign ("-", U+2212 or an en dash) before a number where a number starts: after a space,
#   the text's start, an opening bracket or quote, a comma, colon, semicolon or "=", or a CJK
#   character ("気温は-5度"): "-5" is not "5". After anything else it is a hyphen or a range and
#   splits: "1990-1995", "x-5", "5%-10%", "20°-30°", "(2019)-2020";
# - colons between digits: a time, score or ratio is one number ("7:30" is neither "7" nor "30").
_NUM = re.compile(r"\d[\d.,:]*\d|\d")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"\d+\.\d+")
_CLOCK = re.compile(r"\d+(?::\d+)+")
_SIGN = re.compile(r"[-\u2212\u2013](?=\.?\d)")
_POINT, _MINUS, _COLON = "\x00", "\x01", "\x02"  # placeholders for kept marks: no punctuation class holds them


def _cjk(c: str) -> bool:
    # CJK ideographs and kana: written without spaces between words, so each counts as a word
    o = ord(c)
    return 0x3040 <= o <= 0x30FF or 0x3400 <= o <= 0x4DBF or 0x4E00 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF \
        or 0x20000 <= o <= 0x2FA1F


def _signs_after(c: str) -> bool:
    """Whether a dash right after c starts a number (is a minus sign)."""
    return c.isspace() or c in "([{\"'‘“«,;:=" or _cjk(c)


def _number(m: re.Match) -> str:
    return _run(m.group())


def _run(run: str) -> str:
    if _CLOCK.fullmatch(run):
        return run.replace(":", _COLON)
    if ":" in run:  # colons mixed with other marks ("12.5:3"): each part on its own, split at the colon
        return ":".join(map(_run, run.split(":")))
    if _THOUSANDS.fullmatch(run):
        run = run.replace(",", "")
    return run.replace(".", _POINT) if _DECIMAL.fullmatch(run) else run


def normalise(s: str, numbers: bool = True) -> str:
    """Lower case, punctuation and symbols (ASCII, and every Unicode punctuation mark and symbol: 。،«»,
    °€£×≈ ..., so "20°C" holds "20" and "€5" holds "5") to spaces, each
    CJK character spaced as a word of its own, whitespace collapsed. numbers: keep a number's sign and
    decimal point and drop its thousands commas (the rules above); False: split at them too (the word
    sets of the gate's novelty and of RAG's retrieval, as they were chosen)."""
    # casefold: "Straße" is "STRASSE"; invisible format marks (soft hyphen, zero-width space) go
    s = unicodedata.normalize("NFKC", s).casefold()
    if not s.isascii():
        s = "".join(c for c in s if unicodedata.category(c) != "Cf")
    if numbers:
        s = s.replace(_POINT, " ").replace(_MINUS, " ").replace(_COLON, " ")
        s = re.sub(r"(?<![\w.])\.(?=\d)", "0.", s)  # ".5" is "0.5"
        t = s
        s = _SIGN.sub(lambda m: _MINUS if not m.start() or _signs_after(t[m.start() - 1]) else "-", s)
        s = _NUM.sub(_number, s)
    s = _PUNCT.sub(" ", s)
    if not s.isascii():
        s = "".join(" " if unicodedata.category(c)[0] in "PS" else f" {c} " if _cjk(c) else c for c in s)
    if numbers:
        s = s.replace(_POINT, ".").replace(_MINUS, "-").replace(_COLON, ":")
    return " ".join(s.split())


def first_line(s: str) -> str:
    for line in s.splitlines():
        if line.strip():
            return line
    return ""


def contains_words(haystack: str, needle: str) -> bool:
    n = normalise(needle)
    return bool(n) and f" {n} " in f" {normalise(haystack)} "


_LETTER = re.compile(r"[\s(\[«\"'“‘*_]*([^\W\d_])(?=\s*$|[^\w\s]|_)")  # a lone letter opening a line ("**B**")
_ARTICLE = re.compile(r"(?:the|a|an)\s+(?=\S)", re.IGNORECASE)


def is_correct(continuation: str, answer: str) -> bool:
    """The lenient-but-honest rule: answer as whole words in the first non-empty line. An answer's
    leading English article may be left out ("United States" answers "the United States"); only a
    leading one: "vitamin C" never answers "Vitamin A". A one-letter answer (a multiple-choice "A")
    must open the line on its own ("B", "B.", "(b) Paris"): anywhere in the line, or before a word
    ("A city"), it is the article "a" or the pronoun "I" as often as an answer."""
    line = first_line(continuation)
    n = normalise(answer)
    if len(n) == 1 and n.isalpha() and not _cjk(n):  # an ideograph is a word of its own (see normalise)
        line = unicodedata.normalize("NFC", line)  # "A" + a combining accent is "Á", not "A"
        m = _LETTER.match(line)
        return bool(m) and normalise(m.group(1)) == n and not unicodedata.combining(line[m.end():m.end() + 1] or " ")
    if contains_words(line, answer):
        return True
    bare = _ARTICLE.sub("", answer.strip(), count=1) if _ARTICLE.match(answer.strip()) else ""
    return bool(bare) and contains_words(line, bare)


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
