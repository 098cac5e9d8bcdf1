import math

from c2w.config import C2WConfig, GateConfig, LearnerConfig
from c2w.learners.base import Observation
from c2w.learners.c2w import C2WLearner
from c2w.memory import supersede
from c2w.memory.buffer import Entry
from c2w.memory.views import build_views

OLD = "Ana Velk makes a home in Pekund."
BORN = "Ana Velk was born in Tesk."
OTHER = "Oren Dask works at Halvik Mills."
NEW = "Ana Velk has moved to Ralan."


def entry(i: str, text: str) -> Entry:
    return Entry(i, 0, text, build_views(text, None, True))


def test_candidates_ask_the_new_texts_questions_about_a_shared_name_for_the_entries_other_names():
    cands = supersede.candidates([NEW], [entry("a", OLD), entry("b", BORN), entry("c", OTHER)])
    assert {(eid, a) for _, eid, _, a in cands} == {("a", " Pekund"), ("b", " Tesk")}  # nothing from c: no shared name
    assert {q for _, _, q, _ in cands} == {"Question: Ana Velk has moved to what?\nAnswer:"}  # not "What has moved to Ralan?"


def test_the_cheapest_old_answer_per_question_is_the_conflict(monkeypatch, tiny):
    monkeypatch.setattr(supersede, "answer_nll", lambda m, t, pairs: [1.5 if a == " Pekund" else 4.0 for _, a in pairs])
    found, tokens = supersede.find_conflicts(tiny.model, tiny.tokenizer, [NEW], [entry("a", OLD), entry("b", BORN)])
    assert [(c.entry, c.answer, c.nats) for c in found] == [("a", "Pekund", 1.5)]
    assert tokens > 0
    assert supersede.find_conflicts(tiny.model, tiny.tokenizer, [NEW], [entry("c", OTHER)]) == ([], 0)


def test_retire_drops_the_views_that_state_the_old_answer_and_an_entry_left_empty():
    two = entry("t", "Ana Velk makes a home in Pekund. Ana Velk plays the harp in Orla.")
    one, born = entry("a", OLD), entry("b", BORN)
    c = [supersede.Conflict(0, "a", "q", "Pekund", 1.0), supersede.Conflict(0, "t", "q", "Pekund", 1.0)]
    kept = supersede.retire([one, born, two], c)
    assert [e.id for e in kept] == ["b", "t"]  # a had nothing else to say
    assert born.views == build_views(BORN, None, True)  # untouched
    assert two.views and not any("Pekund" in v for v in two.views) and any("Orla" in v for v in two.views)


def test_the_learner_retires_an_updated_answer_before_its_sleep_and_books_the_compute(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=60, batch_size=2, seed=0)
    kw = dict(router_calibration=6, paraphrase=False, gate=False, supersede=True)
    for nats, gone in ((math.inf, True), (-math.inf, False)):  # every candidate a conflict, or none
        learner = C2WLearner(tiny, cfg, C2WConfig(**kw, supersede_nats=nats), GateConfig())
        learner.observe(0, [Observation("a", 0, OLD), Observation("c", 0, OTHER)])
        learner.end_episode(0)
        learner.observe(1, [Observation("n", 1, NEW)])
        ids = [e.id for e in learner.buffer.entries]
        assert ("a" not in ids) is gone and "c" in ids and "n" in ids
        log = learner.supersede_log
        assert [(g["id"], g["entry"], g["answer"], g["retired"]) for g in log] == [("n", "a", "Pekund", gone)]
        assert learner.cost.flops_by["supersede"] > 0
