"""The router (memory/router.py) and routed evaluation, on the tiny model."""

import numpy as np
import pytest
import torch

from c2w.evaluation.drift import base_logprobs, drift, drift_rows, encode_passages, summarise_drift
from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate
from c2w.learners import LearnerConfig
from c2w.learners.c2w import C2WConfig, C2WLearner
from c2w.learners.lora import LoraLearner
from c2w.memory.router import Router, base_hidden
from c2w.streams.records import Observation, Probe, Record, Stream

BASE_TEXTS = ["The weather today is mild and grey.", "Once upon a time there was a small house.",
              "Music is a way to tell a story.", "In the morning, I walk to the shop.",
              "The history of the town is long.", "Many people believe that tea is good."]
WRITTEN = "Quentor Vilsk was born in Sarnavel."


def router_for(tiny, texts=BASE_TEXTS) -> Router:
    return Router.calibrate(tiny.model, tiny.tokenizer, texts, layer=4)


def test_a_question_about_a_written_name_goes_to_the_adapters_and_others_do_not(tiny):
    r = router_for(tiny)
    r.add(base_hidden(tiny.model, tiny.tokenizer, [WRITTEN], r.layer))
    qs = ["Where was Quentor Vilsk born?", "Quentor Vilsk was born in", "The weather today is", "Music is"]
    assert r.route(base_hidden(tiny.model, tiny.tokenizer, qs, r.layer)) == [True, True, False, False]


def test_nothing_written_routes_everything_to_the_base(tiny):
    r = router_for(tiny)
    assert r.threshold == float("inf")
    assert r.route(base_hidden(tiny.model, tiny.tokenizer, [WRITTEN, "Music is"], r.layer)) == [False, False]


def test_calibration_needs_enough_base_text(tiny):
    with pytest.raises(ValueError, match="at least 3"):
        router_for(tiny, BASE_TEXTS[:2])


def test_router_state_round_trips(tiny):
    r = router_for(tiny)
    r.add(base_hidden(tiny.model, tiny.tokenizer, [WRITTEN], r.layer))
    r2 = Router.from_state_dict(r.state_dict())
    h = base_hidden(tiny.model, tiny.tokenizer, ["Where was Quentor Vilsk born?", "Music is"], r.layer)
    assert r2.threshold == r.threshold and r2.score(h) == r.score(h)


def test_each_calibration_text_is_held_out_once_against_the_others(tiny):
    r = router_for(tiny)
    hid = base_hidden(tiny.model, tiny.tokenizer, BASE_TEXTS, 4)
    assert len(r.folds) == Router.FOLDS and sum(len(neg) for _, neg in r.folds) == len(BASE_TEXTS)
    for f, (contrast, neg) in enumerate(r.folds):
        held = [i for i in range(len(hid)) if i % Router.FOLDS == f]
        assert all(torch.equal(n, hid[i]) for n, i in zip(neg, held))
        assert len(contrast) == sum(len(h) for i, h in enumerate(hid) if i not in held)


def test_score_is_the_mean_over_folds_of_margin_minus_threshold(tiny):
    r = router_for(tiny)
    r.add(base_hidden(tiny.model, tiny.tokenizer, [WRITTEN], r.layer))
    h = base_hidden(tiny.model, tiny.tokenizer, ["Where was Quentor Vilsk born?"], r.layer)[0]
    by_fold = []
    for (contrast, neg), t in zip(r.folds, r.thresholds):
        m = lambda x: float(((x.float() @ r.keys.float().T).amax(1) - (x.float() @ contrast.float().T).amax(1)).max())  # noqa: E731
        assert t == pytest.approx(max(m(n) for n in neg))
        by_fold.append(m(h) - t)
    assert r.score([h])[0] == pytest.approx(sum(by_fold) / len(by_fold))


def test_a_session_12_router_state_still_loads(tiny):
    """Session 12 saved one contrast set and one set of negatives; such a state keeps that rule."""
    hid = base_hidden(tiny.model, tiny.tokenizer, BASE_TEXTS, 4)
    keys = base_hidden(tiny.model, tiny.tokenizer, [WRITTEN], 4)[0]
    old = {"layer": 4, "contrast": torch.cat(hid[:4]), "negatives": hid[4:], "keys": keys}
    r = Router.from_state_dict(old)
    assert len(r.folds) == 1 and set(r.state_dict()) == set(old)
    qs = ["Where was Quentor Vilsk born?", "Music is"]
    assert r.route(base_hidden(tiny.model, tiny.tokenizer, qs, 4)) == [True, False]


def test_base_hidden_ignores_adapters_and_padding(tiny):
    learner = C2WLearner(tiny, LearnerConfig(lr=5e-2, token_budget=200, batch_size=2, seed=0),
                         C2WConfig(gate=False, paraphrase=False, rehearsal=False, sleep=False))
    before = base_hidden(learner.model, tiny.tokenizer, [WRITTEN, "Music is"], 4)
    learner.observe(0, [Observation("a", 0, WRITTEN)])
    after = base_hidden(learner.model, tiny.tokenizer, [WRITTEN, "Music is"], 4)
    alone = base_hidden(learner.model, tiny.tokenizer, ["Music is"], 4)  # no padding in its batch
    for b, a in zip(before, after):
        assert torch.allclose(b.float(), a.float(), atol=1e-3)
    assert torch.allclose(after[1].float(), alone[0].float(), atol=1e-3)


class Routed(LoraLearner):
    """A LoRA learner whose router sends the prompts in `off` to the base."""

    name = "routed"
    off: set = set()

    def route(self, prompts):
        return [p not in self.off for p in prompts]


def test_evaluation_scores_rows_routed_off_on_the_frozen_base(tiny):
    recs = [Record("r1", 0, WRITTEN, (Probe("Quentor Vilsk was born in", "Sarnavel"),)),
            Record("c1", 0, "", (Probe("Music is", "good"),), role="control")]
    stream = Stream(recs, "t")
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [])
    learner = Routed(tiny, LearnerConfig(lr=5e-2, token_budget=300, batch_size=1, seed=0))
    learner.observe(0, stream.observations(0))
    base = evaluate(tiny.model, tiny.tokenizer, ctx)
    adapted = evaluate(learner.model, tiny.tokenizer, ctx)  # no learner: nothing routed
    Routed.off = {"Music is"}
    routed = evaluate(learner.model, tiny.tokenizer, ctx, learner)
    assert adapted.routed is None and routed.routed.tolist() == [True, False]
    assert routed.logprob[0] == pytest.approx(adapted.logprob[0], abs=1e-5)
    assert routed.logprob[1] == pytest.approx(base.logprob[1], abs=1e-5)
    assert abs(adapted.logprob[1] - base.logprob[1]) > 1e-3  # the write did move the control


def test_drift_of_text_routed_to_the_base_is_zero(tiny):
    learner = LoraLearner(tiny, LearnerConfig(lr=5e-2, token_budget=200, batch_size=1, seed=0))
    learner.observe(0, [Observation("a", 0, WRITTEN)])
    passages = encode_passages(tiny.tokenizer, ["The river runs past the old mill.", "Music is a way to tell a story."])
    blp = base_logprobs(tiny.model, passages)
    with torch.no_grad():
        full = drift(learner.model, passages, blp)
        off = drift(learner.model, passages, blp, [False, False])
        half = drift(learner.model, passages, blp, [True, False])
    assert full["kl"] > 0 and off == {"kl": 0.0, "ppl_ratio": 1.0}
    assert 0 < half["kl"] < full["kl"]
    rows = drift_rows(learner.model, passages, blp)  # one pass serves the routed and unrouted drift
    assert summarise_drift(rows) == full and summarise_drift(rows, [True, False]) == half
    assert summarise_drift(rows, [False, False]) == off


def test_a_routed_c2w_learner_keys_what_it_writes(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=80, batch_size=2, seed=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, n_rehearsal=2, router=True, router_calibration=6))
    assert learner.route(["Quentor Vilsk was born in"]) == [False]  # nothing written yet
    learner.observe(0, [Observation("a", 0, WRITTEN)])
    assert learner.route(["Where was Quentor Vilsk born?"]) == [True]
    assert np.isfinite(learner.router.threshold) and learner.state_bytes() > learner.bank.state_bytes()


def test_a_routed_run_reports_what_was_routed_and_the_unrouted_weights(tiny):
    from c2w.evaluation.runner import run_learner

    recs = [Record("r1", 0, WRITTEN, (Probe("Where was Quentor Vilsk born?", "Sarnavel"),)),
            Record("c1", 0, "", (Probe("Music is", "good"),), role="control")]
    stream = Stream(recs, "t")
    passages = encode_passages(tiny.tokenizer, ["Music is a way to tell a story."])
    ctx = EvalContext(stream, build_probeset(stream), "raw", passages, base_logprobs(tiny.model, passages))
    cfg = LearnerConfig(lr=1e-2, token_budget=80, batch_size=2, seed=0, progress_points=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, n_rehearsal=2))
    learner.router = router_for(tiny)  # calibrated on real sentences: the random model's samples are noise
    res = run_learner(learner, ctx, evaluate(tiny.model, tiny.tokenizer, ctx))
    loc = res["locality"]
    assert loc["routed_matrix"] == 1.0 and loc["routed_control"] == 0.0 and loc["routed_text"] == 0.0
    assert loc["kl"] == 0.0 and loc["kl_unrouted"] > 0  # the text went to the base; the weights did move
    assert 0.0 <= loc["control_acc_unrouted"] <= 1.0 and 0.0 <= loc["acc_unrouted"] <= 1.0


def test_a_routed_c2w_learner_keys_all_of_a_long_text(tiny):
    """A key pass reads a text's first max_len tokens: a long text is keyed window by window, so a
    question about its tail still finds its keys."""
    from c2w.learners.train import windows

    long = " ".join(["The old stone bridge over the valley was rebuilt."] * 6) + " " + WRITTEN
    cfg = LearnerConfig(lr=1e-3, token_budget=80, batch_size=2, max_len=32, seed=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, n_rehearsal=2, router=True, router_calibration=6))
    learner.observe(0, [Observation("a", 0, long)])
    wins = windows(tiny.tokenizer, [long], 32)
    assert len(wins) > 1 and WRITTEN in wins[-1]
    assert len(learner.router.keys) == sum(len(tiny.tokenizer(w, add_special_tokens=False).input_ids) - 1 for w in wins)
    assert learner.route(["Where was Quentor Vilsk born?"]) == [True]
