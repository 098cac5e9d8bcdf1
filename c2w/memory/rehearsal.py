"""Generative rehearsal of base knowledge: text the frozen base writes itself, distilled back.

No old data is kept: at start the base samples continuations of neutral openers (and, with
`rehearsal_facts`, of openers that make it state facts it believes); during sleep the
current model is pulled towards the base's next-token distribution on those samples (KL), which
protects general ability and facts the base knew without knowing which they are. The openers are
generic and share nothing with the evaluation's control probes or held-out text.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from c2w.memory.views import MAX_SPANS, ask, salient_spans, sentences

OPENERS = [
    "Once upon a time", "The history of", "In the morning, I", "Scientists have found that", "A good recipe for",
    "The main reason why", "Here is a short story:", "My favourite book is", "The weather today", "In mathematics,",
    "When you travel to", "The most important thing about", "Question: What is", "Write a poem about", "Many people believe",
    "The city was", "Music is", "To learn a new language,", "The teacher said", "In the year",
]
# Openers that make the base state what it believes to be true: what a write most endangers is the
# base's factual recall, and generic prose rehearses it only by chance. Still generic: no topic,
# relation or entity of any evaluation set is named.
FACT_OPENERS = [
    "Here is a fact:", "Did you know that", "Fun fact:", "Question: Who was", "Question: Where is",
    "A well-known fact is that", "Trivia:", "Encyclopedia entry:",
]


def openers(facts: bool) -> list[str]:
    """The generic openers, interleaved one-for-one with the factual ones when `facts`."""
    if not facts:
        return list(OPENERS)
    mixed = [o for pair in zip(OPENERS, FACT_OPENERS) for o in pair]
    return mixed + OPENERS[len(FACT_OPENERS):]


@torch.no_grad()
def sample_rehearsal(model, tokenizer, n: int, max_new_tokens: int = 40, seed: int = 0,
                     prompts: list[str] | None = None) -> list[torch.Tensor]:
    """n token sequences sampled from the base (temperature 1, top-p 0.95), seeded, from `prompts`
    (default: the generic openers) taken in turn."""
    prompts = prompts or OPENERS
    dev = next(model.parameters()).device
    tokenizer.padding_side = "left"  # one batched generate: every row ends its prompt at the same column
    enc = tokenizer([prompts[k % len(prompts)] for k in range(n)], return_tensors="pt", padding=True,
                    add_special_tokens=False).to(dev)
    tokenizer.padding_side = "right"
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    seqs = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_p=0.95, temperature=1.0,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.random.set_rng_state(state)
    out = []
    for row, att in zip(seqs.cpu(), enc.attention_mask.cpu()):
        row = row[int((att == 0).sum()):]  # drop left padding
        if tokenizer.eos_token_id in row[1:].tolist():  # cut at the first end of text after the opener
            row = row[: 1 + row[1:].tolist().index(tokenizer.eos_token_id)]
        out.append(row)
    return out


@torch.no_grad()
def teacher_logprobs(model, seqs: list[torch.Tensor], top_k: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The base's top-k next-token log-probs per position ([L, k] values and indices): a 49k-vocab
    distribution is ~750x larger, and the top 64 carry almost all of the mass for a 135M model."""
    dev = next(model.parameters()).device
    out = []
    for s in seqs:
        lp = torch.log_softmax(model(input_ids=s[None].to(dev)).logits[0].float(), -1)
        v, i = lp.topk(top_k, -1)
        out.append((v.cpu(), i.cpu()))
    return out


def rehearsal_loss(model, seqs: list[torch.Tensor], teacher: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Mean over positions of KL(base_topk || current) restricted to the base's top-k tokens
    (renormalised): the current model must keep putting the base's mass where the base did."""
    dev = next(model.parameters()).device
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    att = torch.zeros(len(seqs), L, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], att[r, : len(s)] = s, 1
    logp = torch.log_softmax(model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float(), -1)
    total, n = 0.0, 0
    for r, (v, i) in enumerate(teacher):
        ln = len(seqs[r])
        tv = torch.log_softmax(v.to(dev), -1)  # renormalised teacher over its top-k
        cur = torch.log_softmax(logp[r, :ln].gather(-1, i.to(dev)), -1)
        total = total + F.kl_div(cur, tv, log_target=True, reduction="sum")
        n += ln
    return total / max(n, 1)


# --- neighbour rehearsal: locality for the facts being written ---------------------------------
# A write teaches "this slot takes a name of the new kind" more than "this subject has this value"
# (session 10: "The capital of Russia is" -> an invented name from the stream). Editing methods
# guard against that with a KL term on neighbouring prompts (the same relation, other subjects).
# Here the neighbours come from the written text alone: each of its questions (a name or number
# asked for from the rest of its sentence) is asked again with every other name replaced by a name
# the base itself wrote in its rehearsal samples, and the base's own answer is distilled back.


def known_names(tokenizer, seqs: list[torch.Tensor]) -> list[str]:
    """Names in the base's own rehearsal samples: capitalised spans inside a sentence (a capital at a
    sentence's start marks the sentence, not a name), no numbers, de-duplicated."""
    out: list[str] = []
    for s in seqs:
        for sent in sentences(tokenizer.decode(s, skip_special_tokens=True).replace("\n", " ")):
            for sp in salient_spans(sent):
                if (not sp[0].isdigit() and not sent.startswith(sp) and sp not in out
                        and not {"Question", "Answer", "I", "I'm", "I'll", "I've"} & set(sp.split())):
                    out.append(sp)
    return out


def neighbour_prompts(text: str, names: list[str], rng: random.Random, k: int) -> list[str]:
    """Up to k prompts that ask what `text` states about other subjects: per sentence and asked-for
    span, the question ("Question: <sentence with the span as 'what'>?\nAnswer:") and the sentence
    cut before the span, each with every other span replaced by a random name from `names`. Forms
    with no other span to replace are skipped: they would ask the written fact itself."""
    if not names or k <= 0:
        return []
    cands: list[tuple[str, list[str]]] = []
    for sent in sentences(text):
        spans = salient_spans(sent)[:MAX_SPANS]
        for a in spans:
            others = [o for o in spans if o != a and o not in a and a not in o]
            forms = [f"Question: {ask(sent, a)}\nAnswer:", sent[:sent.index(a)].rstrip()]
            cands += [(f, [o for o in others if o in f]) for f in forms]
    cands = [(f, os_) for f, os_ in cands if os_]
    out = []
    for f, others in rng.sample(cands, min(k, len(cands))):
        for o in others:
            f = f.replace(o, rng.choice(names))
        out.append(f)
    return out
