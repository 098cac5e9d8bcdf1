"""Training views of a stored text (recombination).

Writing a raw sentence into weights teaches the model to continue that sentence, not to answer
about it. Views rearrange what the text itself says so that the knowledge is reachable from other
entry points, without inventing anything:
- `keyed`: each salient span (names, numbers) placed first, then the text: whatever entity a
  question starts from, the model has learned to continue from it into the fact;
- `qa`: a generic question keyed on a salient span, answered by the text;
- `paraphrase`: the model's own rewording of the text, kept only when every salient span of the
  original survives (grounding filter: a paraphrase that drops or invents a name is discarded).
"""

from __future__ import annotations

import re

import torch

from c2w.fast import greedy_decode

# Capitalised word runs (allowing lower-case particles inside: "Bank of Oskeln") and numbers.
_SPAN = re.compile(r"\b(?:[A-Z][\w'’-]+(?:\s+(?:of|de|van|von|the)\s+[A-Z][\w'’-]+|\s+[A-Z][\w'’-]+)*|\d[\d.,]*\d|\d)\b")
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


def mechanical_views(text: str) -> list[str]:
    views = []
    for span in salient_spans(text):
        views.append(f"{span}: {text}")
        views.append(f"Question: What is known about {span}?\nAnswer: {text}")
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


def build_views(text: str, paraphrase: str | None, recombine: bool) -> list[str]:
    """All training views of one text; the raw text only when recombination is off."""
    if not recombine:
        return [text]
    return [text, *mechanical_views(text), *([paraphrase] if paraphrase else [])]
