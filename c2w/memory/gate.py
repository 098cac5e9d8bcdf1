"""The write gate: decide, from the text alone and the current model, what is worth writing.

Signals per text (on the current model, fast + slow adapters active; familiarity, compressibility and
uncertainty on the frozen base by default, `familiarity_on_base`):
- surprise: mean next-token NLL of the text on the current model (from the trial step's forward; nan
  for a text turned away before the trial; a text of several sentences: the mean over those tried);
- familiarity: how predictable the text's content is, three rules (`GateConfig.familiarity`):
  - `cloze` (default, on the frozen base): the largest summed NLL of a name or number asked for
    from the rest of its sentence ("Question: What is the capital city of Uganda?\nAnswer:" ->
    " Kampala"). A fact the base knows has every part predictable from the others, in any order;
    a new fact has a part nothing predicts. On validation seeds 1000-1001 the known records of the
    gate-stress stream cost 4.7-12.7 nats, the cheapest new fact 26.4 (`scripts/gate_signals.py`);
  - `units`: the largest summed NLL over the content units (names, numbers, the last word) after
    the first 3 tokens, read left to right. It cannot see that "Kampala" in "Kampala is the
    capital city of Uganda." is known: nothing comes before it. It let 11 of 12 known records
    through on the stress stream (BENCHMARKS.md);
  - `words`: the largest NLL of any word after the first content unit (the topic, which nothing
    before it can predict). It stops the known facts a 135M base predicts left to right (capital
    cities: <= 5.6 nats on validation) and turns away a few new facts whose every word after the
    topic is cheap ("X was established in 1973"). Measured in BENCHMARKS.md, where it lost on the
    reported seeds.
  Mean NLL alone does not separate known from new (a short known fact with a rare first word is
  "surprising");
- uncertainty: mean predictive entropy over the text's positions;
- novelty: 1 - the largest word-set overlap (Jaccard) with texts already stored or seen this
  episode (exact and near duplicates score ~0). Under `min_novelty` a text is a duplicate only when
  it also adds no word to that stored text (`repeats`): a passage restated with a fact changed is
  near, but it is an update;
- compressibility: nats per UTF-8 byte of the text on the frozen base (with `familiarity_on_base`).
  Language, new names included, compresses; random strings do not (3.66-4.12 nats per byte on
  the validation streams against at most 3.08 for a new fact; other languages, code and tables
  0.68-2.19, scripts/gate_bytes.py). Above `max_nats_per_byte` a text is
  "not language" and skips the trial step;
- learnability: relative fall of the text's NLL after one trial gradient step on it, undone
  afterwards. Facts in fluent language drop fast; random noise is surprising but barely moves. A
  text of several sentences: the median over its sentences (at most 8), each stepped on alone,
  since one step spread over many facts moves each less (`trial_pieces`).
Decision: write when novelty, familiarity, compressibility and learnability all clear their thresholds;
optionally keep only the top-k by surprise x learnability (budget-aware). Thresholds were set on
validation streams (seeds 1000 and up) only.
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass

import torch

from c2w.config import FAMILIARITY_RULES, GateConfig  # noqa: F401  (GateConfig re-exported)
from c2w.evaluation.scoring import normalise
from c2w.fast import lm_loss
from c2w.memory.views import MAX_SPANS, UPPER, ask, salient_spans, sentences

RULES = FAMILIARITY_RULES


@dataclass
class GateScore:
    surprise: float
    uncertainty: float
    unit_surprise: float
    novelty: float
    learnability: float
    write: bool = False
    reason: str = ""
    nats_per_byte: float = float("nan")


def _words(t: str) -> set[str]:
    return set(normalise(t, numbers=False).split())


def novelty(text: str, stored: list[set[str]]) -> float:
    w = _words(text)
    if not w or not stored:
        return 1.0
    return 1.0 - max(len(w & s) / len(w | s) for s in stored)


def repeats(text: str, stored: list[set[str]], min_novelty: float) -> bool:
    """Whether the text repeats a stored one: a near duplicate (novelty under min_novelty against it)
    that adds no word of its own. A corrected passage restated with one number or name changed is as
    near ("opened in 1931" -> "opened in 1933": novelty 0.05), but its new word is the update."""
    w = _words(text)
    return any(1.0 - len(w & s) / len(w | s) < min_novelty and w <= s for s in stored if w | s)


_WORD = re.compile(r"[\w'’-]+")
_UNIT = re.compile(rf"\b(?:{UPPER}[\w'’-]+(?:\s+{UPPER}[\w'’-]+)*|\d[\d.,]*)")


def content_units(text: str) -> list[tuple[int, int]]:
    """Character spans of names, numbers and the last word."""
    units = [m.span() for m in _UNIT.finditer(text)]
    last = list(_WORD.finditer(text))
    if last and last[-1].span() not in units:
        units.append(last[-1].span())
    return units


@torch.no_grad()
def text_signals(model, tokenizer, texts: list[str], max_len: int = 128, rule: str = "units") -> list[tuple[float, float, float]]:
    """(mean NLL, mean entropy, familiarity) per text. Familiarity, `units`: the largest summed NLL
    over content units after the first 3 tokens; `words`: the largest NLL of a word after the first
    content unit (every word but the first if none follows it); `cloze`: see `cloze_familiarity`.
    inf when there is nothing to score."""
    if rule not in RULES:
        raise ValueError(f"familiarity rule must be one of {RULES}, got {rule!r}")
    cloze = cloze_familiarity(model, tokenizer, texts) if rule == "cloze" else None
    dev = next(model.parameters()).device
    out = []
    for i, t in enumerate(texts):
        enc = tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids], device=dev)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [L-1, V]
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]  # nll[t-1] = cost of token t
        ent = -(logp.exp() * logp).sum(-1)
        offs = enc.offset_mapping  # a BPE token's span may include the space before a word

        def cost(a: int, b: int, first: int = 1) -> float | None:
            toks = [k for k in range(first, len(offs)) if offs[k][0] < b and offs[k][1] > a]
            return float(sum(nll[k - 1] for k in toks)) if toks else None

        if cloze is not None:
            scored = [cloze[i]] if math.isfinite(cloze[i]) else []
        elif rule == "units":
            scored = [c for a, b in content_units(t) if (c := cost(a, b, first=3)) is not None]
        else:
            units = content_units(t)
            topic_end = units[0][1] if units else 0
            words = [(w.start(), c) for w in _WORD.finditer(t) if (c := cost(*w.span())) is not None]
            # after the topic; if the topic ends the text, every word but the first
            scored = [c for start, c in words if start >= topic_end] or [c for _, c in words]
        out.append((nll.mean().item() if len(nll) else 0.0, ent.mean().item() if len(ent) else 0.0,
                    max(scored) if scored else float("inf")))
    return out


def nats_per_byte(tokenizer, text: str, mean_nll: float, max_len: int = 128) -> float:
    """A text's summed next-token NLL (mean_nll over its first max_len tokens, as text_signals
    scores them) per UTF-8 byte of the part scored."""
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_len).input_ids
    return mean_nll * max(len(ids) - 1, 0) / max(1, len(tokenizer.decode(ids).encode()))


def cloze_pairs(texts: list[str]) -> list[tuple[int, str, str]]:
    """(text index, question, " answer") for every salient span of every sentence."""
    return [(k, f"Question: {ask(sent, span)}\nAnswer:", " " + span)
            for k, t in enumerate(texts) for sent in sentences(t) for span in salient_spans(sent)[:MAX_SPANS]]


@torch.no_grad()
def cloze_familiarity(model, tokenizer, texts: list[str], batch_size: int = 16, max_len: int = 128) -> list[float]:
    """Per text, the largest summed NLL of a salient span (name, number) given the rest of its
    sentence as a question: "Question: Kampala is the capital city of what?\nAnswer:" -> " Uganda".
    A fact the model knows has every part predictable from the others, in any order; reading left
    to right cannot see that "Kampala" in "Kampala is the capital city of Uganda." is known, since
    nothing comes before it. A new fact has a part nothing predicts. inf for a text without spans.
    A question longer than `max_len` tokens keeps its end (the part next to the answer)."""
    pairs = cloze_pairs(texts)
    dev = next(model.parameters()).device
    worst = [float("-inf")] * len(texts)
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b: b + batch_size]
        pre = [tokenizer(q, add_special_tokens=False).input_ids for _, q, _ in chunk]
        ans = [tokenizer(a, add_special_tokens=False).input_ids[: max_len // 2] for _, _, a in chunk]
        pre = [p[-(max_len - len(a)):] for p, a in zip(pre, ans)]  # [B] lists; logits [B, <=max_len, V]
        L = max(len(p) + len(a) for p, a in zip(pre, ans))
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        att = torch.zeros(len(chunk), L, dtype=torch.long)
        for r, (p, a) in enumerate(zip(pre, ans)):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            att[r, : len(p) + len(a)] = 1
        logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float(), -1)
        for r, ((k, _, _), p, a) in enumerate(zip(chunk, pre, ans)):
            pos = torch.arange(len(p) - 1, len(p) + len(a) - 1, device=dev)  # logits predicting the answer
            cost = -logp[r, pos].gather(-1, torch.tensor(a, device=dev)[:, None]).sum().item()
            worst[k] = max(worst[k], cost)
    return [w if w > float("-inf") else float("inf") for w in worst]


def learnability(model, tokenizer, params: list[torch.Tensor], text: str, lr: float, max_len: int = 128) -> tuple[float, float]:
    """(relative NLL drop after one normalised-gradient step on `text` alone, the mean NLL before
    it: the current model's surprise); parameters restored."""
    from c2w.learners.train import collate  # here, not at the top: c2w.learners imports this module

    dev = next(model.parameters()).device
    ids, att = collate(tokenizer, [text], max_len, dev)
    loss = lm_loss(model, ids, att, att.bool())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).clamp(min=1e-8)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p.sub_(lr * g / norm)
        after = lm_loss(model, ids, att, att.bool()).item()
        for p, s in zip(params, saved):
            p.copy_(s)
    return (loss.item() - after) / max(loss.item(), 1e-6), loss.item()


TRIAL_SENTENCES = 8  # a long text's trial steps: at most this many of its sentences, evenly spaced
MIN_TRIAL_CHARS = 12  # shorter lines and sentences (headings, "Notes:") are not tried


def trial_pieces(text: str) -> list[str]:
    """What the learnability probe steps on: a text of one sentence whole; of several, each of at
    most TRIAL_SENTENCES sentences (evenly spaced) alone. One normalised step spread over a text of
    many facts moves each fact less. On SmolLM2 (validation seeds 1000-1002), whole documents of 20
    new facts (252-285 tokens) scored 0.0065-0.0105, all below the 0.011 threshold, and documents
    of 4 facts 0.0096-0.0155 (8 of 18 below); the median over their sentences was 0.019-0.024 and
    0.017-0.032 (none below), and random noise, which has no sentence ends, is tried whole as before."""
    sents = [s for line in text.splitlines() for s in sentences(line)]  # a line break ends a sentence too
    sents = [s for s in sents if len(s) >= MIN_TRIAL_CHARS] or sents  # a heading ("Summary") says nothing
    if len(sents) <= 1:
        return [text]
    n = min(len(sents), TRIAL_SENTENCES)
    return [sents[round(i * (len(sents) - 1) / max(n - 1, 1))] for i in range(n)]


def text_learnability(model, tokenizer, params: list[torch.Tensor], text: str, lr: float) -> tuple[float, float]:
    """`learnability` of a text: the median over its `trial_pieces` of the relative NLL drop, and
    the mean of their NLLs before the step (one piece: exactly `learnability` of the text)."""
    runs = [learnability(model, tokenizer, params, p, lr) for p in trial_pieces(text)]
    return statistics.median(d for d, _ in runs), sum(nll for _, nll in runs) / len(runs)


def score_texts(model, tokenizer, params, texts: list[str], stored: list[str], cfg: GateConfig) -> list[GateScore]:
    """Score an episode's texts in order; a text also counts as `stored` for those after it.
    Duplicates are found from the words alone and cost no model pass (their other signals are nan)."""
    seen, nov, fresh = [_words(t) for t in stored], [], []
    for k, t in enumerate(texts):
        nov.append(novelty(t, seen))
        if nov[-1] >= cfg.min_novelty or not repeats(t, seen, cfg.min_novelty):
            fresh.append(k)
        seen.append(_words(t))
    on_base = cfg.familiarity_on_base and hasattr(model, "disable_adapter")
    # One pass per text: on the base (familiarity, compressibility, uncertainty) when `on_base`, else
    # on the current model. No decision reads the current model's mean NLL; the trial step's first
    # forward gives it for every text that is tried (surprise), so no second pass is spent on it.
    with model.disable_adapter() if on_base else torch.no_grad():
        sig = text_signals(model, tokenizer, [texts[k] for k in fresh], rule=cfg.familiarity)
    by_text = dict(zip(fresh, sig))
    per_byte = {k: nats_per_byte(tokenizer, texts[k], nll) for k, (nll, _, _) in zip(fresh, sig)}
    out = []
    for k, t in enumerate(texts):
        if k not in by_text:
            out.append(GateScore(float("nan"), float("nan"), float("nan"), nov[k], float("nan"), reason="duplicate"))
            continue
        s, u, fam = by_text[k]
        known = fam < cfg.familiarity_threshold
        garbled = bool(cfg.max_nats_per_byte) and per_byte[k] > cfg.max_nats_per_byte
        lrn = float("nan")
        if not (known or garbled):
            lrn, s = text_learnability(model, tokenizer, params, t, cfg.trial_lr)
        elif on_base:
            s = float("nan")  # not tried: the current model's NLL was never computed
        g = GateScore(s, u, fam, nov[k], lrn, nats_per_byte=per_byte[k])
        if known:
            g.reason = "known"
        elif garbled:
            g.reason = "not language"
        elif not lrn >= cfg.min_learnability:
            g.reason = "not learnable"
        else:
            g.write, g.reason = True, "write"
        out.append(g)
    if cfg.top_k:
        ranked = sorted((k for k, g in enumerate(out) if g.write), key=lambda k: -out[k].surprise * out[k].learnability)
        for k in ranked[cfg.top_k:]:
            out[k].write, out[k].reason = False, "over top-k"
    return out
