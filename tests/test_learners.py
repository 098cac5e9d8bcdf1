"""Behaviour of the baselines on the tiny model."""

import dataclasses

import pytest
import torch

from c2w.evaluation.scoring import score_probes
from c2w.fast.llama import attend_math as ATTEND_MATH
from c2w.learners import BASELINES, LearnerConfig, make_learner
from c2w.streams.records import Observation

FACT = Observation("f1", 0, "Mira Talvik was born in the harbour town of Oskeln.")
PROMPT, ANSWER = "Mira Talvik was born in the harbour town of", "Oskeln"


def recall(learner):
    s = score_probes(learner.model, learner.tokenizer, learner.contextualize([PROMPT]), [ANSWER])[0]
    return s.correct, s.logprob


@pytest.mark.parametrize("method,lr,bf16", [("lora", 1e-2, False), ("full-ft", 3e-3, False), ("lora", 1e-2, True)])
def test_a_write_raises_recall_of_the_written_fact(tiny, method, lr, bf16, monkeypatch):
    from c2w.fast import llama

    math_calls = []  # attention in bf16 (llama.attend_math) runs only when the write is under autocast
    monkeypatch.setattr(llama, "attend_math", lambda *a: math_calls.append(1) or ATTEND_MATH(*a))
    learner = make_learner(method, tiny, LearnerConfig(lr=lr, token_budget=40 * 14, batch_size=1, seed=0, bf16_writes=bf16))
    ok0, lp0 = recall(learner)
    learner.observe(0, [FACT])
    assert bool(math_calls) == bf16
    ok1, lp1 = recall(learner)
    assert not ok0 and ok1
    assert lp1 > lp0 + 1.0
    assert learner.cost.trained_tokens >= 40 * 14 and learner.written_ids == {"f1"}
    assert all(p.dtype == torch.float32 for p in learner.params)  # bf16 autocast leaves the weights fp32


def test_writes_leave_the_shared_backbone_frozen_and_unchanged(tiny):
    before = [p.clone() for p in tiny.model.parameters()]
    for m in ("lora", "full-ft", "lora-replay"):
        make_learner(m, tiny, LearnerConfig(lr=1e-2, token_budget=50, seed=0)).observe(0, [FACT])
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.model.parameters()))
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_none_never_changes(tiny):
    learner = make_learner("none", tiny, LearnerConfig())
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    for ep in range(3):
        learner.observe(ep, [Observation(f"x{ep}", ep, "Some new fact about Oskeln.")])
        learner.end_episode(ep)
    after = learner.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert learner.cost.trained_tokens == 0 and learner.contextualize(["p"]) == ["p"]


def test_rag_retrieves_the_observed_text(tiny):
    learner = make_learner("rag", tiny, LearnerConfig(rag_k=1))
    learner.observe(0, [FACT, Observation("f2", 0, "The river Quell flows through Dastmoor.")])
    (p,) = learner.contextualize(["Question: Where was Mira Talvik born?\nAnswer:"])
    assert p.startswith(FACT.text) and p.endswith("Answer:")
    assert learner.cost.trained_tokens == 0


def test_rag_chunks_a_long_text_and_retrieves_the_chunk_asked_about(tiny):
    filler = " ".join(f"The {w} bridge over the valley was rebuilt in {1800 + k}." for k, w in
                      enumerate(["old", "stone", "iron", "wooden", "long", "narrow", "high", "low"]))
    doc = Observation("d1", 0, f"{filler} {FACT.text} {filler}")
    learner = make_learner("rag", tiny, LearnerConfig(rag_k=1, rag_chunk_tokens=48))
    learner.observe(0, [doc, Observation("f2", 0, "The river Quell flows through Dastmoor.")])
    assert len(learner.docs) > 3 and learner.docs[-1] == "The river Quell flows through Dastmoor."  # short: whole
    (p,) = learner.contextualize(["Question: Where was Mira Talvik born?\nAnswer:"])
    ctx = p.split("\n\n")[0]
    assert FACT.text in ctx and len(tiny.tokenizer(ctx).input_ids) <= 48  # the fact's chunk, not the document
    whole = make_learner("rag", tiny, LearnerConfig(rag_k=1, rag_chunk_tokens=0))
    whole.observe(0, [doc])
    assert whole.docs == [doc.text]


def test_replay_buffer_is_bounded_and_budget_counts_replay(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=60, buffer_size=3, batch_size=4, replay_fraction=0.5, seed=0)
    learner = make_learner("lora-replay", tiny, cfg)
    for ep in range(3):
        learner.observe(ep, [Observation(f"r{ep}{k}", ep, f"Fact {ep} number {k} about Oskeln.") for k in range(4)])
    assert len(learner.buffer) == 3
    # every episode spends exactly its budget: the last batch is cut to fit
    assert learner.cost.trained_tokens == 3 * 60


def test_unknown_method_is_rejected(tiny):
    with pytest.raises(ValueError, match="unknown method 'lora2'"):
        make_learner("lora2", tiny, LearnerConfig())


def test_observation_exposes_only_id_episode_text():
    assert [f.name for f in dataclasses.fields(Observation)] == ["id", "episode", "text"]
    assert not hasattr(FACT, "__dict__")  # slots: nothing can be attached to it
    with pytest.raises(dataclasses.FrozenInstanceError):
        FACT.text = "x"


def test_every_baseline_is_registered():
    from c2w.learners import METHODS

    assert set(BASELINES) <= set(METHODS)


def test_fit_budget_cuts_whole_rows_then_a_head_and_drops_empty_rows():
    from c2w.learners.train import fit_budget

    ids = torch.arange(12).view(3, 4)
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    same = fit_budget(ids, att, 9)
    assert same[1] is att
    i, a = fit_budget(ids, att, 5)
    assert a.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]] and i.tolist() == ids[:2].tolist()
    i, a = fit_budget(ids, att, 0)
    assert len(i) == 0 and len(a) == 0


def test_windows_keep_short_texts_whole_and_cut_long_ones_at_sentence_ends(tiny):
    from c2w.learners.train import windows

    tok = tiny.tokenizer
    short = "Tam lives in Prell."
    sents = [f"The river number {i} flows past the town of Ralan and into the sea." for i in range(12)]
    long = " ".join(sents)
    out = windows(tok, [short, long], 48)
    assert out[0] is short
    pieces = out[1:]
    assert len(pieces) > 1 and " ".join(pieces) == long  # the whole text, in order, nothing lost
    assert all(len(tok(p, add_special_tokens=False).input_ids) <= 48 for p in pieces)
    assert all(p.endswith("sea.") for p in pieces)  # each cut at a sentence end
    # no sentence end in reach: cut at token boundaries, nothing lost
    run_on = "x" * 2000
    pieces = windows(tok, [run_on], 48)
    assert "".join(pieces) == run_on and all(len(tok(p, add_special_tokens=False).input_ids) <= 48 for p in pieces)
    lines = "\n".join(["one line of plain words"] * 40)
    assert "\n".join(windows(tok, [lines], 48)) == lines
    # a full stop inside a number or a name is no sentence end
    rates = " ".join(f"The rate at station {i} rose to 11.5 units per day in www.example.com records." for i in range(12))
    assert not any(p.endswith(("11.", "www.example.")) for p in windows(tok, [rates], 48))
    # characters of several byte tokens are never cut in two: nothing lost, no window over the limit
    cjk = "洛阳城东路旁散去的人又回来了。" * 3 + "鬰鬱麤齉爨驫纛" * 20
    pieces = windows(tok, [cjk], 48)
    assert "".join(pieces) == cjk and all(len(tok(p, add_special_tokens=False).input_ids) <= 48 for p in pieces)

    class Slow:  # a tokenizer without offsets (transformers' Python tokenizers): decoded token runs
        is_fast = False

        def __call__(self, *a, **k):
            assert "return_offsets_mapping" not in k
            return tok(*a, **k)

        def decode(self, *a, **k):
            return tok.decode(*a, **k)

    pieces = windows(Slow(), [short, long], 48)
    assert pieces[0] is short and "".join("".join(pieces[1:]).split()) == "".join(long.split())  # cut anywhere
    assert all(len(tok(p, add_special_tokens=False).input_ids) <= 48 for p in pieces)


@pytest.mark.parametrize("method", ["lora", "full-ft", "lora-replay"])
def test_baselines_write_the_tail_of_a_text_longer_than_a_write_step(tiny, method, monkeypatch):
    """A write step keeps a text's first max_len tokens: the tail of a long text must still be
    trained on (as its own window), not silently dropped."""
    from c2w.learners import train

    seen: list[str] = []
    collate = train.collate

    def spy(tokenizer, texts, max_len, device):
        ids, att = collate(tokenizer, texts, max_len, device)
        seen.extend(tokenizer.decode(r[m.bool()]) for r, m in zip(ids, att))
        return ids, att

    monkeypatch.setattr(train, "collate", spy)
    long = " ".join(["The old stone bridge over the valley was rebuilt."] * 6) + " Mira was born in Oskeln."
    assert len(tiny.tokenizer(long).input_ids) > 32
    learner = make_learner(method, tiny, LearnerConfig(lr=1e-3, token_budget=400, max_len=32, batch_size=2, seed=0))
    learner.observe(0, [Observation("f1", 0, long)])
    assert any("Mira was born in Oskeln." in s for s in seen)
    assert all(len(tiny.tokenizer(t).input_ids) <= 32 for t in getattr(learner, "buffer", []))
