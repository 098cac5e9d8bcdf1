"""The evaluator's contract with learners, on the tiny model."""

import dataclasses
import types

import numpy as np
import torch

from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate, run_learner, summarise
from c2w.learners import LearnerConfig
from c2w.learners.lora import LoraLearner
from c2w.learners.none import NoneLearner
from c2w.streams.fictional import FictionalConfig, generate_fictional
from c2w.streams.records import Observation, Probe, Record, Stream


class SpyLearner(LoraLearner):
    """A LoRA learner that keeps everything it is handed."""

    name = "spy"

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.received: list = []

    def observe_steps(self, episode, observations):
        self.received.append((episode, list(observations)))
        yield from super().observe_steps(episode, observations)

    def end_episode(self, episode):
        self.received.append(("end", episode))


def stream_with_every_role() -> Stream:
    s = generate_fictional(FictionalConfig(episodes=2, facts_per_episode=3, update_fraction=0.5, noise_per_episode=1,
                                           duplicates_per_episode=1, known_per_episode=1, seed=0))
    ctrl = Record("c0001", 0, "", (Probe("The capital of France is", "Paris"),), role="control")
    return Stream(s.records + [ctrl], "t")


def test_learners_cannot_reach_roles_probes_or_replaces(tiny):
    stream = stream_with_every_role()
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [])
    learner = SpyLearner(tiny, LearnerConfig(token_budget=40, progress_points=2))
    run_learner(learner, ctx, evaluate(tiny.model, tiny.tokenizer, ctx))
    observed = [o for ep, obs in learner.received if ep != "end" for o in obs]
    # only Observations, only observed roles, nothing but id/episode/text
    assert all(type(o) is Observation for o in observed)
    assert {o.id for o in observed} == {r.id for r in stream.records if r.role != "control"}
    # and nothing of the evaluator's is reachable from the learner's own state
    for obj in reachable(learner):
        assert not isinstance(obj, (Record, Probe, Stream, EvalContext)), f"learner reaches {type(obj).__name__}"


def reachable(root):
    """Objects reachable from root through attributes, containers and closures (not module globals)."""
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None), torch.Tensor, type, types.ModuleType)):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif isinstance(obj, types.FunctionType):
            todo.extend(c.cell_contents for c in obj.__closure__ or ())
        elif isinstance(obj, types.MethodType):
            todo.append(obj.__self__)
        else:
            todo.extend(getattr(obj, "__dict__", {}).values())
            todo.extend(getattr(obj, s) for s in getattr(type(obj), "__slots__", ()) if hasattr(obj, s))


def test_run_produces_every_metric_group(tiny):
    stream = stream_with_every_role()
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [])
    res = run_learner(LoraLearner(tiny, LearnerConfig(token_budget=60, progress_points=2)), ctx,
                      evaluate(tiny.model, tiny.tokenizer, ctx))
    R = np.array(res["accuracy_matrix"])
    assert R.shape == (2, 2) and ((0 <= R) & (R <= 1)).all()
    for key in ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "retention", "strict", "logprob", "flips",
                "updates", "locality", "learning_speed", "gate", "cost"):
        assert key in res
    assert res["updates"]["n"] >= 1
    assert res["gate"]["written_noise"] == 1.0 and res["gate"]["written_learn"] == 1.0  # baselines write all
    assert len(res["learning_speed"]["acc"]) == 4  # start, 2 inside the write, end
    assert res["cost"]["trained_tokens"] >= 2 * 60 and res["cost"]["trainable_params"] > 0


def test_probeset_scores_replaced_facts_apart():
    stream = stream_with_every_role()
    ps = build_probeset(stream)
    replaced = {r.replaces for r in stream.records if r.replaces}
    assert replaced and all(it.kind == "stale" for it in ps.items if it.record_id in replaced)
    assert {it.record_id for it in ps.items if it.kind == "control"} == {"c0001"}
    roles = {r.id: r.role for r in stream.records}
    assert all(roles[it.record_id] == "learn" for it in ps.items if it.kind == "matrix")


def test_drift_is_measured_for_weight_writers_and_zero_for_the_base(tiny, monkeypatch):
    from c2w.evaluation import runner
    from c2w.evaluation.drift import base_logprobs, encode_passages
    from c2w.learners.none import NoneLearner

    stream = stream_with_every_role()
    passages = encode_passages(tiny.tokenizer, ["The river runs past the old mill and into the sea."])
    ctx = EvalContext(stream, build_probeset(stream), "raw", passages, base_logprobs(tiny.model, passages))
    base = evaluate(tiny.model, tiny.tokenizer, ctx)
    lora = run_learner(LoraLearner(tiny, LearnerConfig(token_budget=60, progress_points=0, lr=1e-2)), ctx, base,
                       setup_s=2.5)
    assert lora["locality"]["kl"] > 0 and lora["locality"]["ppl_ratio"] != 1.0
    assert lora["cost"]["setup_s"] == 2.5 and lora["cost"]["wall_s"] >= 2.5  # building the learner is paid for
    calls = []
    monkeypatch.setattr(runner, "drift", lambda *a: calls.append(a) or {"kl": 9.0, "ppl_ratio": 9.0})
    none = run_learner(NoneLearner(tiny, LearnerConfig()), ctx, base)
    assert none["locality"]["kl"] == 0.0 and none["locality"]["ppl_ratio"] == 1.0 and not calls


def test_known_records_the_base_answers_are_counted_apart(tiny):
    stream = stream_with_every_role()
    known = [r.id for r in stream.records if r.role == "known"]
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [], known_to_base=frozenset(known[:1]))
    res = run_learner(LoraLearner(tiny, LearnerConfig(token_budget=40, progress_points=0)), ctx,
                      evaluate(tiny.model, tiny.tokenizer, ctx))
    assert len(known) == 2 and res["gate"]["known_to_base"] == 0.5
    assert res["gate"]["written_known_to_base"] == 1.0  # lora writes everything it observes


def _passage_stream(fix_text: str, fix_probes: tuple, *extra: Record) -> Stream:
    old = Record("bridge", 0, "The Karsten Bridge opened in 1931 in the city of Vemdal. Its first toll keeper was Agnes Holm.",
                 (Probe("The Karsten Bridge opened in", "1931"), Probe("The Karsten Bridge is in the city of", "Vemdal"),
                  Probe("The first toll keeper of the Karsten Bridge was", "Agnes Holm")))
    fix = Record("bridge_fix", 1, fix_text, fix_probes, replaces="bridge")
    return Stream([old, fix, *extra], "t")


def test_a_replacing_record_retires_only_the_old_answers_it_changes():
    # a corrected passage restates the facts that still hold: they stay in the matrix, in episode 0
    stream = _passage_stream("The Karsten Bridge opened in 1933 in the city of Vemdal. Its first toll keeper was Agnes Holm.",
                             (Probe("the Karsten bridge opened in ", "1933"),))  # same prompt, case and spacing aside
    kinds = {(it.record_id, it.probe.answer): (it.kind, it.episode) for it in build_probeset(stream).items}
    assert kinds == {("bridge", "1931"): ("stale", 0), ("bridge", "Vemdal"): ("matrix", 0),
                     ("bridge", "Agnes Holm"): ("matrix", 0), ("bridge_fix", "1933"): ("matrix", 1)}
    # a correction note that neither asks nor restates a fact retires it (the record is replaced)
    note = _passage_stream("Correction: the Karsten Bridge opened in 1933, in Vemdal.", (Probe("The bridge opened in", "1933"),))
    stale = {it.probe.answer for it in build_probeset(note).items if it.kind == "stale"}
    assert stale == {"1931", "Agnes Holm"}  # 1931 is absent from the note's text ("1933" is another number)
    # the same prompt asked again with the same answer: still true
    same = _passage_stream("The Karsten Bridge opened in 1931.", (Probe("The Karsten Bridge opened in", "1931"),))
    assert not [it for it in build_probeset(same).items if it.kind == "stale" and it.probe.answer == "1931"]


def test_records_replacing_one_id_twice_form_a_chain():
    second = Record("bridge_fix2", 2, "The Karsten Bridge opened in 1934.", (Probe("The Karsten Bridge opened in", "1934"),),
                    replaces="bridge")
    stream = _passage_stream("The Karsten Bridge opened in 1933.", (Probe("The Karsten Bridge opened in", "1933"),), second)
    ps = build_probeset(stream)
    assert ps.updates == [("bridge_fix", "bridge"), ("bridge_fix2", "bridge_fix")]
    kinds = {(it.record_id, it.probe.answer): it.kind for it in ps.items}
    assert kinds[("bridge", "1931")] == kinds[("bridge_fix", "1933")] == "stale"
    assert kinds[("bridge_fix2", "1934")] == "matrix"


def test_a_later_link_of_a_chain_can_change_what_an_earlier_one_kept():
    keeper = Record("bridge_fix2", 2, "The Karsten Bridge opened in 1933. Its first toll keeper was Mary Lund.",
                    (Probe("The first toll keeper of the Karsten Bridge was", "Mary Lund"),), replaces="bridge")
    stream = _passage_stream("The Karsten Bridge opened in 1933 in the city of Vemdal. Its first toll keeper was Agnes Holm.",
                             (Probe("The Karsten Bridge opened in", "1933"),), keeper)
    ps = build_probeset(stream)
    kinds = {(it.record_id, it.probe.answer): it.kind for it in ps.items}
    # the first fix kept Agnes Holm (it restated her); the second asks her prompt again with another answer
    assert kinds[("bridge", "Agnes Holm")] == "stale" and kinds[("bridge", "1931")] == "stale"
    # it asks an old prompt, so what it does not ask stays: Vemdal (not in its text) and the first fix's 1933
    assert kinds[("bridge", "Vemdal")] == "matrix" and kinds[("bridge_fix", "1933")] == "matrix"
    retired = {it.probe.answer: it.retired_by for it in ps.items if it.kind == "stale"}
    assert retired == {"1931": "bridge_fix", "Agnes Holm": "bridge_fix2"}  # each update is scored on what it changed


def test_partial_updates_of_one_record_keep_each_other():
    # news-style updates: each changes one fact of the same record and says nothing of the others
    old = Record("tor", 0, "Tor Almqvist lives in Oskeln and works at Tarn Bank.",
                 (Probe("Tor Almqvist lives in", "Oskeln"), Probe("Tor Almqvist works at", "Tarn Bank")))
    home = Record("tor_home", 1, "Tor Almqvist now lives in Prell.", (Probe("Tor Almqvist lives in", "Prell"),),
                  replaces="tor")
    job = Record("tor_job", 2, "Tor Almqvist now works at Holm Mill.", (Probe("Tor Almqvist works at", "Holm Mill"),),
                 replaces="tor")
    ps = build_probeset(Stream([old, home, job], "t"))
    kinds = {(it.record_id, it.probe.answer): (it.kind, it.retired_by) for it in ps.items}
    assert kinds == {("tor", "Oskeln"): ("stale", "tor_home"), ("tor", "Tarn Bank"): ("stale", "tor_job"),
                     ("tor_home", "Prell"): ("matrix", None), ("tor_job", "Holm Mill"): ("matrix", None)}
    # a note that asks no old prompt falls back on its text, for the record it names only
    note = Record("tor_note", 3, "Correction: Tor Almqvist works at Holm Mills.", (Probe("Where does Tor work?", "Holm Mills"),),
                  replaces="tor")
    kinds = {(it.record_id, it.probe.answer): it.kind for it in build_probeset(Stream([old, home, job, note], "t")).items}
    assert kinds[("tor_home", "Prell")] == kinds[("tor_job", "Holm Mill")] == "matrix"


def test_update_metrics_score_each_update_on_what_it_retired(tiny):
    old = Record("tor", 0, "Tor Almqvist lives in Oskeln and works at Tarn Bank.",
                 (Probe("Tor Almqvist lives in", "Oskeln"), Probe("Tor Almqvist works at", "Tarn Bank")))
    home = Record("tor_home", 1, "Tor Almqvist now lives in Prell.",
                  (Probe("Tor Almqvist lives in", "Prell"), Probe("Question: Where does Tor Almqvist live?\nAnswer:", "Prell")),
                  replaces="tor")
    stream = Stream([old, home], "t")
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [])
    base = evaluate(tiny.model, tiny.tokenizer, ctx)
    snap = dataclasses.replace(base, correct=np.array([False, False, True, False]))  # tor x2 (one stale), tor_home x2
    res = summarise(NoneLearner(tiny, LearnerConfig()), ctx, base, [snap, snap], [[0.0, 0.0]] * 2, 0.0)
    assert res["updates"] == {"new_answer_acc": 0.5, "stale_persistence": 0.0, "n": 1}  # one of two right is half
    # two updates of one record: each is scored on the old answer it retired, not on every stale probe of the record
    job = Record("tor_job", 2, "Tor Almqvist now works at Holm Mill.", (Probe("Tor Almqvist works at", "Holm Mill"),),
                 replaces="tor")
    stream = Stream([old, home, job], "t")
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [])
    base = evaluate(tiny.model, tiny.tokenizer, ctx)
    # items: Oskeln (stale, by tor_home), Tarn Bank (stale, by tor_job), Prell x2, Holm Mill
    snap = dataclasses.replace(base, correct=np.array([True, False, True, True, False]))
    res = summarise(NoneLearner(tiny, LearnerConfig()), ctx, base, [snap] * 3, [[0.0, 0.0]] * 3, 0.0)
    assert res["updates"] == {"new_answer_acc": 0.5, "stale_persistence": 0.5, "n": 2}
    snap = dataclasses.replace(base, correct=np.array([False, True, True, True, False]))  # Tarn Bank persists
    res = summarise(NoneLearner(tiny, LearnerConfig()), ctx, base, [snap] * 3, [[0.0, 0.0]] * 3, 0.0)
    assert res["updates"]["stale_persistence"] == 0.5


def test_a_replaces_target_outside_the_stream_is_ignored():
    # bench builds sub-streams (the known records alone) whose replaces may point outside them
    ps = build_probeset(Stream([Record("k1", 1, "Paris is in France.", (Probe("Paris is in", "France"),), role="known",
                                       replaces="f0001")], "t"))
    assert ps.updates == [] and ps.items == []


def test_the_evaluator_scores_from_kept_packed_weights_with_the_same_results(tiny, monkeypatch):
    """run_learner holds llama.keep_packed() through the run: every evaluation finds it open, the packs
    go when the run ends, and the run's numbers are those of per-call plans (log-probs within fp32
    rounding)."""
    import contextlib

    from c2w.evaluation import runner
    from c2w.fast import llama

    stream = stream_with_every_role()
    ctx = EvalContext(stream, build_probeset(stream), "raw", [], [])
    base = evaluate(tiny.model, tiny.tokenizer, ctx)
    seen = []
    real = runner.score_routed
    monkeypatch.setattr(runner, "score_routed", lambda *a, **k: (real(*a, **k), seen.append(llama.kept_pack_bytes() > 0))[0])
    run = lambda: run_learner(LoraLearner(tiny, LearnerConfig(token_budget=60, progress_points=2, seed=0)), ctx, base)  # noqa: E731
    kept = run()
    assert seen and all(seen) and llama._PACKS is None
    assert kept["cost"]["eval_packed_mb"] > 0  # packed before the run's memory baseline, reported apart
    seen.clear()
    monkeypatch.setattr(llama, "keep_packed", contextlib.nullcontext)
    plain = run()
    assert seen and not any(seen) and plain["cost"]["eval_packed_mb"] == 0
    assert kept["accuracy_matrix"] == plain["accuracy_matrix"]
    assert np.allclose(kept["logprob"]["matrix"], plain["logprob"]["matrix"], atol=1e-4, equal_nan=True)
