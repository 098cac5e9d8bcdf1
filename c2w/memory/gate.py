"""The write gate: decide, from the text alone and the current model, what is worth writing.

Signals per text (on the current model, fast + slow adapters active; familiarity optionally on the base):
- surprise: mean next-token NLL of the text;
- familiarity: how predictable the text's content is, two rules (`GateConfig.familiarity`):
  - `units` (default): the largest summed NLL over the content units (names, numbers, the last
    word) after the first 3 tokens. A fact the model knows has every unit predictable; a new fact
    has at least one surprising unit. Known facts often still score high through their first
    name, and lower-case answers ("likes black") are not units;
  - `words`: the largest NLL of any word after the first content unit (the topic, which nothing
    before it can predict), on the frozen base when `familiarity_on_base`. It stops the known
    facts a 135M base really predicts (capital cities: <= 5.6 nats on validation) and turns away
    a few new facts whose every word after the topic is cheap ("X was established in 1973").
    Measured in BENCHMARKS.md, where it lost on the reported seeds; not the default.
  Mean NLL alone does not separate known from new (a short known fact with a rare first word is
  "surprising");
- uncertainty: mean predictive entropy over the text's positions;
- novelty: 1 - the largest word-set overlap (Jaccard) with texts already stored or seen this
  episode (exact and near duplicates score ~0);
- learnability: relative fall of the text's NLL after one trial gradient step on it, undone
  afterwards. Facts in fluent language drop fast; random noise is surprising but barely moves.
Decision: write when novelty, unit surprise and learnability all clear their thresholds;
optionally keep only the top-k by surprise x learnability (budget-aware). Thresholds were set on
the validation stream (seed 1000) only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from c2w.config import GateConfig  # noqa: F401  (re-exported)
from c2w.evaluation.scoring import normalise
from c2w.fast import lm_loss
from c2w.learners.train import collate


@dataclass
class GateScore:
    surprise: float
    uncertainty: float
    unit_surprise: float
    novelty: float
    learnability: float
    write: bool = False
    reason: str = ""


def _words(t: str) -> set[str]:
    return set(normalise(t).split())


def novelty(text: str, stored: list[set[str]]) -> float:
    w = _words(text)
    if not w or not stored:
        return 1.0
    return 1.0 - max(len(w & s) / len(w | s) for s in stored)


_WORD = re.compile(r"[\w'’-]+")
_UNIT = re.compile(r"\b(?:[A-Z][\w'’-]+(?:\s+[A-Z][\w'’-]+)*|\d[\d.,]*)")


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
    content unit (every word but the first if none follows it). inf when there is nothing to score."""
    if rule not in ("units", "words"):
        raise ValueError(f"familiarity rule must be 'units' or 'words', got {rule!r}")
    dev = next(model.parameters()).device
    out = []
    for t in texts:
        enc = tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_len, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids], device=dev)
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # [L-1, V]
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]  # nll[t-1] = cost of token t
        ent = -(logp.exp() * logp).sum(-1)
        offs = enc.offset_mapping  # a BPE token's span may include the space before a word

        def cost(a: int, b: int, first: int = 1) -> float | None:
            toks = [k for k in range(first, len(offs)) if offs[k][0] < b and offs[k][1] > a]
            return float(sum(nll[k - 1] for k in toks)) if toks else None

        units = content_units(t)
        if rule == "units":
            scored = [c for a, b in units if (c := cost(a, b, first=3)) is not None]
        else:
            topic_end = units[0][1] if units else 0
            words = [(w.start(), c) for w in _WORD.finditer(t) if (c := cost(*w.span())) is not None]
            # after the topic; if the topic ends the text, every word but the first
            scored = [c for start, c in words if start >= topic_end] or [c for _, c in words]
        out.append((nll.mean().item() if len(nll) else 0.0, ent.mean().item() if len(ent) else 0.0,
                    max(scored) if scored else float("inf")))
    return out


def learnability(model, tokenizer, params: list[torch.Tensor], text: str, lr: float, max_len: int = 128) -> float:
    """Relative NLL drop after one normalised-gradient step on `text` alone; parameters restored."""
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
    return (loss.item() - after) / max(loss.item(), 1e-6)


def score_texts(model, tokenizer, params, texts: list[str], stored: list[str], cfg: GateConfig) -> list[GateScore]:
    """Score an episode's texts in order; a text also counts as `stored` for those after it."""
    seen = [_words(t) for t in stored]
    out = []
    sig = text_signals(model, tokenizer, texts, rule=cfg.familiarity)
    if cfg.familiarity_on_base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base_fam = [f for _, _, f in text_signals(model, tokenizer, texts, rule=cfg.familiarity)]
        sig = [(s, u, f) for (s, u, _), f in zip(sig, base_fam)]
    for t, (s, u, unit) in zip(texts, sig):
        nov = novelty(t, seen)
        known = unit < cfg.familiarity_threshold
        cheap_no = nov < cfg.min_novelty or known  # skip the trial step
        lrn = float("nan") if cheap_no else learnability(model, tokenizer, params, t, cfg.trial_lr)
        g = GateScore(s, u, unit, nov, lrn)
        if nov < cfg.min_novelty:
            g.reason = "duplicate"
        elif known:
            g.reason = "known"
        elif not lrn >= cfg.min_learnability:
            g.reason = "not learnable"
        else:
            g.write, g.reason = True, "write"
        seen.append(_words(t))
        out.append(g)
    if cfg.top_k:
        ranked = sorted((k for k, g in enumerate(out) if g.write), key=lambda k: -out[k].surprise * out[k].learnability)
        for k in ranked[cfg.top_k:]:
            out[k].write, out[k].reason = False, "over top-k"
    return out
