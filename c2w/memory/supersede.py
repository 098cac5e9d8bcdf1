"""Updates: a new text that answers an old question differently retires the old answer from replay.

Sleep replays the episodic buffer, so an old fact that a new text corrects ("Ana has moved to
Ralan." after "Ana makes a home in Pekund.") is rehearsed on and on, and the stale answer persists.
A learner never sees which record replaces which (`replaces` stays with the evaluator), so the
conflict is read from the model:

    for each written text T, each buffered entry E that shares a name with T, and each of T's cloze
    questions about a shared name ("Question: Ana has moved to what?\\nAnswer:"): the current model's
    NLL of each of E's other names (" Pekund") as the answer. Where the best of them costs less
    than `max_nats`, the model already answers T's question with E's name: E held the old answer.

The retired name's views leave E (the sentences that state it, the raw text when it holds it; E
goes when nothing is left). What earlier sleeps consolidated into the slow adapter stays; only its
rehearsal stops. Run before the new texts are trained on, so that the model still holds the old state.
"""

from __future__ import annotations

from dataclasses import dataclass

from c2w.memory.buffer import Entry
from c2w.memory.gate import answer_nll, cloze_pairs
from c2w.memory.views import salient_spans


@dataclass
class Conflict:
    text: int  # index of the new text
    entry: str  # id of the buffered entry
    question: str  # the new text's question
    answer: str  # the entry's name the model answers it with
    nats: float  # its NLL


def candidates(texts: list[str], entries: list[Entry]) -> list[tuple[int, str, str, str]]:
    """(text index, entry id, question, " old answer") to score: questions of a new text that contain a
    name it shares with a buffered entry, against that entry's names the new text does not hold."""
    out = []
    for k, t in enumerate(texts):
        names = set(salient_spans(t))
        qs = cloze_pairs([t])
        for e in entries:
            theirs = salient_spans(e.text)
            shared = names.intersection(theirs)
            if not shared:
                continue
            old = [n for n in theirs if n not in names]
            for _, q, _ in qs:
                if any(s in q for s in shared):
                    out += [(k, e.id, q, " " + n) for n in old]
    return out


def find_conflicts(model, tokenizer, texts: list[str], entries: list[Entry]) -> tuple[list[Conflict], int]:
    """Per (new text, question), the cheapest old answer (the caller keeps those under its
    threshold); and the tokens scored (one forward over each question and answer, for the bill)."""
    cands = candidates(texts, entries)
    if not cands:
        return [], 0
    nll = answer_nll(model, tokenizer, [(q, a) for _, _, q, a in cands])
    best: dict[tuple[int, str], Conflict] = {}
    for (k, eid, q, a), n in zip(cands, nll):
        c = best.get((k, q))
        if c is None or n < c.nats:
            best[(k, q)] = Conflict(k, eid, q, a.strip(), n)
    tokens = sum(len(tokenizer(q + a, add_special_tokens=False).input_ids) for _, _, q, a in cands)
    return list(best.values()), tokens


def retire(entries: list[Entry], conflicts: list[Conflict]) -> list[Entry]:
    """The entries without the views that state a retired answer; an entry left with no view goes."""
    gone: dict[str, set[str]] = {}
    for c in conflicts:
        gone.setdefault(c.entry, set()).add(c.answer)
    kept = []
    for e in entries:
        if e.id in gone:
            e.views = [v for v in e.views if not any(a in v for a in gone[e.id])]
            if not e.views:
                continue
        kept.append(e)
    return kept
