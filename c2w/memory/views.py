"""Training views of a stored text (recombination).

Writing a raw sentence into weights teaches the model to continue that sentence, not to answer
about it. Views rearrange what the text itself says so that the knowledge is reachable from other
entry points, without inventing anything. Two styles (`C2WConfig.view_style`):
- `cloze-qa`: per sentence and per salient span (names, numbers): the span as the short answer to
  the sentence with that span turned into a question word ("Question: Ralan lies on the river
  what?\nAnswer: Pekund."), plus the span-keyed sentence ("Pekund: Ralan lies on ..."). A reader
  is asked for the span itself, first, which is how questions are answered;
- `describe`: per salient span, the span-keyed text and "Question: What is known about X?\nAnswer:
  <the whole text>" (the earlier style: it teaches long answers that bury the asked-for span);
- either style adds `paraphrase`: the model's own rewording of the text, kept only when every
  salient span of the original survives (grounding filter: a paraphrase that drops or invents a
  name is discarded).
"""

from __future__ import annotations

import re

import torch

from c2w.fast import greedy_decode

# A capital letter of any alphabet ("Émile", "Łódź", "Ørsted", "Δήλος"), as a regex class.
UPPER = "[" + "".join(re.escape(c) for c in map(chr, range(0x10000)) if c.isupper() or c.istitle()) + "]"
# Capitalised word runs (allowing lower-case particles inside: "Bank of Oskeln") and numbers.
_SPAN = re.compile(rf"\b(?:{UPPER}[\w'’-]+(?:\s+(?:of|de|van|von|the)\s+{UPPER}[\w'’-]+|\s+{UPPER}[\w'’-]+)*|\d[\d.,]*\d|\d)\b")
_FULL_STOPS = "。！？।॥"  # sentence ends of scripts that need no space after them
_GAP = re.compile(rf"\s+|(?<=[{_FULL_STOPS}])")  # where a sentence may end: a run of spaces, or right after one
_LINE_BREAKS = "\n\r\u2028\u2029\x85"
WRAP = 50  # prose wrapped by hand runs 60-80 characters a line; list items, table rows and headings are shorter
_ITEM = re.compile(r"(?:[-*•·–]|\d{1,3}[.)]|[a-z][.)])\s")  # "- x", "• x", "3. x", "b) x"
_STOP = {"The", "A", "An", "In", "On", "At", "It", "He", "She", "They", "This", "That", "These", "Those", "After",
         "Before", "Born", "Since", "When", "While", "Its", "His", "Her", "Their", "As", "By", "For", "From", "To"}


def salient_spans(text: str) -> list[str]:
    """Names and numbers in order of appearance, de-duplicated; sentence-initial function words dropped."""
    out: list[str] = []
    for m in _SPAN.finditer(text):
        s = m.group(0)
        words = s.split()
        while words and words[0] in _STOP:
            words = words[1:]
        s = " ".join(words)
        if s and s not in out:
            out.append(s)
    return out


VIEW_STYLES = ("cloze-qa", "describe")
MAX_SPANS = 8  # per sentence: a long list of names would otherwise multiply the views
# Words that end sentences without carrying what the sentence says ("... likes red best.").
_END_STOP = {"it", "them", "him", "her", "us", "me", "you", "this", "that", "there", "here", "too", "also", "again",
             "now", "then", "well", "best", "most", "more", "less", "ago", "before", "after", "away", "today", "soon",
             "yet", "still", "instead", "though", "either", "all", "one", "ones", "else", "much", "many", "way"}


def end_focus(sentence: str) -> str | None:
    """The sentence's last word when it is a lower-case content word ("... works as a translator."):
    English puts new information last, and answers that are common nouns or adjectives (a
    profession, a colour) are no name or number, so salient_spans never asks for them."""
    m = re.search(r"\b([a-z][a-z'’-]{2,})\W*$", sentence.strip())
    if not m or m.group(1) in _END_STOP:
        return None
    return m.group(1)


def sentences(text: str) -> list[str]:
    """Split after 。！？ and the Devanagari danda (।, ॥; no space needed); at ., ! or ? followed by a
    space and a word that does not start lower case (a capital, a digit, or a letter of a script
    without case: Arabic, Hebrew, Devanagari); and at a line break that ends a line of a list, a
    table or a heading, not one that wraps prose (`_ends_line`). "e.g. the" stays whole; "St. Ives"
    does not."""
    text, out, start, line = text.strip(), [], 0, 0  # line: where the current line starts
    for m in _GAP.finditer(text):
        a, b = m.span()
        before, after = text[a - 1:a], text[b:b + 1]
        gap = m.group().replace("\r\n", "\n")
        breaks = sum(gap.count(c) for c in _LINE_BREAKS)
        if after and (before in _FULL_STOPS or breaks and _ends_line(text, a, b, breaks, a - line)
                      or before in ".!?" and (after.isdecimal() or after.isalpha() and not after.islower())
                      and not _ITEM.fullmatch(text, line, b)):  # "2. Tor Lund": an item's number
            out.append(text[start:a])
            start = b
        if breaks:
            line = b
    out.append(text[start:])
    return [p for p in (s.strip() for s in out) if p]


def _ends_line(text: str, a: int, b: int, breaks: int, length: int) -> bool:
    """Whether spaces text[a:b] holding `breaks` line breaks, after a line of `length` characters, end a
    sentence: a blank line, a line ending in . ! ? : or ;, a short line (under WRAP characters: a list
    item, a table row, a heading), or a next line opening a list item. A long line broken
    mid-sentence is hand-wrapped prose and goes on."""
    return breaks > 1 or text[a - 1] in ".!?:;" or length < WRAP or bool(_ITEM.match(text, b))


def ask(sentence: str, span: str) -> str:
    """The sentence as a question whose answer is `span`: the span becomes a question word."""
    q = sentence.rstrip(" .!?" + _FULL_STOPS)
    # where the span stands on its own: "31" in "In 1931 the club had 31 members" is the second match,
    # and neither "5" in "3.5" nor "500" in "1,500" nor "Olaf" in "Olaf-Peter" is the span
    m = re.search(rf"(?<![\w'’.,-]){re.escape(span)}(?![\w'’-]|[.,]\d)", q)
    q = q[:m.start()] + "what" + q[m.end():] if m else q.replace(span, "what", 1)
    return q[:1].upper() + q[1:] + "?"


def mechanical_views(text: str, style: str = "cloze-qa", end_words: bool = False) -> list[str]:
    """cloze-qa views of each salient span (and, with end_words, of each sentence's end_focus word)."""
    if style not in VIEW_STYLES:
        raise ValueError(f"view style must be one of {VIEW_STYLES}, got {style!r}")
    views = []
    if style == "describe":
        for span in salient_spans(text):
            views.append(f"{span}: {text}")
            views.append(f"Question: What is known about {span}?\nAnswer: {text}")
        return views
    for sent in sentences(text):
        spans = salient_spans(sent)[:MAX_SPANS]
        end = end_focus(sent) if end_words else None
        for span in spans:
            views.append(f"{span}: {sent}")
            views.append(f"Question: {ask(sent, span)}\nAnswer: {span}.")
        if end:  # the last word, asked for where it stands (not at an earlier match inside a word)
            q = sent.rstrip(" .!?")
            i = q.rfind(end)
            views.append(f"{end}: {sent}")
            views.append(f"Question: {q[:i]}what{q[i + len(end):]}?\nAnswer: {end}.")
    return views


PARAPHRASE_PROMPT = "Rewrite the following sentence in different words, keeping every name and number.\nSentence: {text}\nRewritten:"


@torch.no_grad()
def paraphrases(model, tokenizer, texts: list[str], max_new_tokens: int = 40) -> list[str | None]:
    """One greedy paraphrase per text by the model itself; None where the grounding filter rejects it."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": PARAPHRASE_PROMPT.format(text=t)}],
                                             tokenize=False, add_generation_prompt=True)
               if getattr(tokenizer, "chat_template", None) else PARAPHRASE_PROMPT.format(text=t) for t in texts]
    ids = greedy_decode(model, tokenizer, prompts, [max_new_tokens] * len(texts))
    out: list[str | None] = []
    for t, x in zip(texts, ids):
        p = tokenizer.decode(x, skip_special_tokens=True).strip().split("\n")[0].strip()
        spans = salient_spans(t)
        grounded = p and p != t and spans and all(s in p for s in spans) and set(salient_spans(p)) <= set(spans)
        out.append(p if grounded else None)
    return out


def build_views(text: str, paraphrase: str | None, recombine: bool, style: str = "cloze-qa",
                end_words: bool = False, raw: list[str] | None = None) -> list[str]:
    """All training views of one text; the raw text only when recombination is off. `raw`: the
    raw text as written (`learners.train.windows`: a long text's windows), default [text]."""
    raw = [text] if raw is None else raw
    if not recombine:
        return list(raw)
    return [*raw, *mechanical_views(text, style, end_words), *([paraphrase] if paraphrase else [])]
