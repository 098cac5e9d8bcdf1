"""The c2w learner on the tiny model: gate ranking, sleep keeps buffered facts, ablations run."""

import math
import random

import pytest
import torch

from c2w.backbone import Backbone
from c2w.evaluation.scoring import score_probes
from c2w.learners import C2W_ABLATIONS, LearnerConfig, make_learner
from c2w.learners.c2w import ABLATIONS, C2W_METHODS, C2WConfig, C2WLearner
from c2w.learners.full_ft import FullFTLearner
from c2w.learners.lora import lora_config
from c2w.memory.bank import AdapterBank
from c2w.memory.gate import GateConfig, nats_per_byte, score_texts
from c2w.streams.records import Observation

NAMES = ["Arlen", "Bosk", "Corvin", "Dalia", "Eskel", "Fenna", "Gorm", "Hilde", "Ivar", "Jorun", "Kell", "Liss"]
TOWNS = ["Ardon", "Brisk", "Calder", "Dunmere", "Elst", "Farrow", "Glent", "Harth", "Islow", "Jarrow", "Kestle", "Lorn"]
KNOWN = "Dalia Moor was born in the town of Dunmere."
NEW = "Quentor Vilsk was born in the town of Sarnavel."
NOISE = "xq7 zzpl 0k3v mrr8 qa1 vvd9 ktt2 wq0"


CORPUS = [f"{n} Moor was born in the town of {t}." for n, t in zip(NAMES, TOWNS)]


def school(tiny, corpus: list[str], token_budget: int, batch_size: int, name: str) -> Backbone:
    """The tiny model after a little full fine-tuning on `corpus` (shuffled), frozen."""
    rng = random.Random(0)
    learner = FullFTLearner(tiny, LearnerConfig(lr=3e-3, token_budget=token_budget, batch_size=batch_size, seed=0))
    learner.observe(0, [Observation(f"p{k}", 0, s) for k, s in enumerate(rng.sample(corpus, len(corpus)))])
    model = learner.model.requires_grad_(False).eval()
    return Backbone(model, tiny.tokenizer, name, tiny.device)


@pytest.fixture(scope="module")
def schooled(tiny):
    """The tiny model after a little 'pretraining' on templated sentences, KNOWN among them, so
    that it has a language to be surprised by and a fact it already knows."""
    return school(tiny, CORPUS, len(CORPUS) * 14 * 40, 6, "tiny-schooled")


def test_gate_ranks_a_new_fact_above_noise_and_above_a_known_fact(schooled):
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    known, new, noise = score_texts(bank.model, schooled.tokenizer, bank.fast_params(), [KNOWN, NEW, NOISE], [],
                                    GateConfig(familiarity="units", min_unit_surprise=-1, min_novelty=0, min_learnability=-1,
                                               max_nats_per_byte=0))
    assert new.unit_surprise > known.unit_surprise  # the known fact's units are predictable
    assert new.learnability > noise.learnability  # noise is surprising but barely learnable
    assert noise.nats_per_byte > new.nats_per_byte > known.nats_per_byte  # and it does not compress
    dup = score_texts(bank.model, schooled.tokenizer, bank.fast_params(), [NEW], [NEW], GateConfig())[0]
    assert dup.novelty == 0.0 and not dup.write and dup.reason == "duplicate"


def test_a_near_duplicate_that_changes_a_word_is_an_update_not_a_duplicate():
    from c2w.memory.gate import _words, repeats

    old = "The Karsten Bridge over the river Oll in Vemdal opened in 1931 and carries four lanes of road traffic."
    fix = old.replace("1931", "1933")
    stored = [_words(old)]
    assert repeats(old, stored, 0.2) and repeats(old.upper() + "!", stored, 0.2)  # exact up to case and marks
    assert repeats(old.replace(" four", ""), stored, 0.2)  # a word dropped: nothing new
    assert not repeats(fix, stored, 0.2)  # novelty 0.1 (under 0.2), but "1933" is new
    assert not repeats("A ferry crosses the river Oll.", stored, 0.2)  # far from it: no repeat either


def test_the_gate_sends_a_corrected_restatement_on_to_its_other_signals(schooled):
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    cfg = GateConfig(familiarity="units", min_unit_surprise=-1, min_novelty=0.2, min_learnability=-1, max_nats_per_byte=0)
    text = NEW[:-1] + " and later studied the old maps of the northern coast with her brother."
    fixed = text.replace("Sarnavel", "Dunmere")  # novelty 2/17: near, and one word new
    dup, fix = score_texts(bank.model, schooled.tokenizer, bank.fast_params(), [text, fixed], [text], cfg)
    assert dup.reason == "duplicate" and not dup.write
    assert fix.novelty < 0.2 and fix.reason == "write" and fix.write


def test_the_gate_turns_away_text_that_does_not_compress_without_a_trial_step(schooled):
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    new, noise = score_texts(bank.model, schooled.tokenizer, bank.fast_params(), [NEW, NOISE], [],
                             GateConfig(familiarity="units", min_unit_surprise=-1, min_learnability=-1))
    assert noise.nats_per_byte > GateConfig().max_nats_per_byte > new.nats_per_byte
    assert (noise.write, noise.reason) == (False, "not language") and math.isnan(noise.learnability)
    assert math.isnan(noise.surprise)  # no trial, so the current model never scored it: no extra pass for it
    assert new.write and math.isfinite(new.learnability)


def test_nats_per_byte_is_the_summed_nll_over_the_bytes_scored(tiny):
    text = "Quentor Vilsk was born in Sarnavel."
    n = len(tiny.tokenizer(text, add_special_tokens=False).input_ids)
    assert nats_per_byte(tiny.tokenizer, text, 2.0) == pytest.approx(2.0 * (n - 1) / len(text.encode()))
    long = " ".join([text] * 40)  # past max_len: only the scored head counts
    head = tiny.tokenizer.decode(tiny.tokenizer(long, add_special_tokens=False).input_ids[:16])
    assert nats_per_byte(tiny.tokenizer, long, 2.0, max_len=16) == pytest.approx(2.0 * 15 / len(head.encode()))


def test_sleep_does_not_lower_recall_of_buffered_facts(tiny):
    cfg = LearnerConfig(lr=1e-2, token_budget=1200, batch_size=2, seed=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, gate=False, recombination=False, rehearsal=True, n_rehearsal=2))
    facts = [Observation("a", 0, "Mira Talvik was born in Oskeln."), Observation("b", 0, "Pell Odrin works for Vask.")]
    learner.observe(0, facts)
    prompts, answers = ["Mira Talvik was born in", "Pell Odrin works for"], ["Oskeln", "Vask"]
    before = score_probes(learner.model, tiny.tokenizer, prompts, answers)
    learner.end_episode(0)
    after = score_probes(learner.model, tiny.tokenizer, prompts, answers)
    assert learner.bank.slow == "slow1" and learner.sleeps == 1
    for b, a in zip(before, after):
        assert a.correct >= b.correct
        assert a.logprob >= b.logprob - 0.25
    assert sum(b.correct for b in before) >= 1  # the write itself worked


def test_gate_off_writes_everything_and_gate_on_skips_exact_duplicates(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=40, seed=0)
    obs = [Observation("a", 0, "Mira Talvik was born in Oskeln."), Observation("b", 0, "Mira Talvik was born in Oskeln.")]
    off = make_learner("c2w-no-gate", tiny, cfg)
    off.observe(0, obs)
    assert off.written_ids == {"a", "b"}
    on = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, paraphrase=False, rehearsal=False), GateConfig(familiarity="units", min_unit_surprise=-1, min_learnability=-1, max_nats_per_byte=0))
    on.observe(0, obs)
    assert on.written_ids == {"a"} and [g["reason"] for g in on.gate_log] == ["write", "duplicate"]


@pytest.mark.parametrize("method", ["c2w", *C2W_ABLATIONS])
def test_every_ablation_runs_within_budget(tiny, method):
    cfg = LearnerConfig(lr=1e-3, token_budget=80, batch_size=2, seed=0)
    # the tiny random model has no language for the SmolLM2-set gate thresholds: gate off here
    c2w = C2WConfig(**{**ABLATIONS[method], "gate": False, "paraphrase": False, "n_rehearsal": 2,
                          "router_calibration": 6})  # 96 HF samples take ~12 s on the tiny model
    learner = C2W_METHODS[method](tiny, cfg, c2w)
    assert learner.name == method
    obs = [Observation("a", 0, "Mira Talvik was born in Oskeln."), Observation("b", 0, "Pell Odrin works for Vask.")]
    learner.observe(0, obs)
    learner.end_episode(0)
    # wake + sleep never exceed the episode's budget, rehearsal included
    assert learner.cost.trained_tokens <= 80
    assert learner.cost.trained_tokens > 0


@pytest.mark.parametrize("bf16_sleep", [False, True])
def test_c2w_writes_under_bf16_autocast_and_sleeps_in_fp32_unless_asked(tiny, monkeypatch, bf16_sleep):
    from c2w.fast import llama

    calls = []  # the lean attention's bf16 path: it runs only under bf16 autocast
    real = llama.attend_math
    monkeypatch.setattr(llama, "attend_math", lambda *a: calls.append(1) or real(*a))
    cfg = LearnerConfig(lr=1e-3, token_budget=80, batch_size=2, seed=0, bf16_writes=True)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, router_calibration=6, bf16_sleep=bf16_sleep))
    learner.observe(0, [Observation("a", 0, "Mira Talvik was born in Oskeln.")])
    wake = len(calls)
    learner.end_episode(0)
    assert wake > 0  # the online write ran in bf16
    assert (len(calls) > wake) == bf16_sleep  # the sleep's replay only when asked
    assert learner.cost.trained_tokens == 80 and learner.sleeps == 1
    assert all(p.dtype == torch.float32 for p in learner.bank.fast_params())
    assert llama._LOWP is None and llama._SCRATCH is None  # step_cache lives only while a write loop runs


@pytest.mark.parametrize("dnn", [False, True])
def test_fp32_writes_reuse_the_loss_scratch_across_steps(tiny, monkeypatch, dnn):
    """The write loop holds step_cache() in fp32 too: the loss's [N, V] buffers are kept between
    steps (the same bytes come back at the next step), and nothing is kept after the loop. (With
    oneDNN's products, fp32's default, the logits come fresh from oneDNN: one buffer a chunk is kept.)"""
    from c2w.fast import llama

    monkeypatch.setattr(llama, "DNN", dnn)

    seen = []  # (kept?, address) of every scratch buffer handed out
    real = llama._scratch

    def spy(*a):
        buf = real(*a)
        seen.append((llama._SCRATCH is not None, buf.data_ptr()))
        return buf

    monkeypatch.setattr(llama, "_scratch", spy)
    cfg = LearnerConfig(lr=1e-3, token_budget=80, batch_size=2, seed=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, rehearsal=False, router_calibration=6))
    learner.observe(0, [Observation("a", 0, "Mira Talvik was born in Oskeln.")])
    learner.end_episode(0)  # the sleep's replay: a write loop of several steps
    kept = [ptr for on, ptr in seen if on]
    assert learner.cost.train_steps >= 2 and len(kept) >= (1 if dnn else 2) * learner.cost.train_steps
    assert len(set(kept)) < len(kept)  # the same buffers again
    assert llama._SCRATCH is None


def test_gate_spends_budget_in_proportion_to_what_it_writes(tiny):
    # exact duplicates are turned away by novelty alone (the other signals are switched off here)
    cfg = LearnerConfig(lr=1e-3, token_budget=200, batch_size=2, seed=0)
    gate = GateConfig(familiarity="units", min_unit_surprise=-1, min_learnability=-1, max_nats_per_byte=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, paraphrase=False, rehearsal=False), gate)
    a, b = "Mira Talvik was born in Oskeln.", "Pell Odrin works for Vask."
    learner.observe(0, [Observation("a", 0, a), Observation("a2", 0, a), Observation("b", 0, b), Observation("b2", 0, b)])
    learner.end_episode(0)
    assert learner.written_ids == {"a", "b"}
    assert learner.cost.trained_tokens == 200 // 2  # half written: half the budget, wake and sleep
    # every FLOP is booked to one part; the write compute is all but the one-time setup
    by = learner.cost.flops_by
    assert {"setup", "gate", "keys", "wake", "sleep", "priorities"} <= set(by)
    assert math.isclose(sum(by.values()), learner.cost.flops)
    assert math.isclose(learner.cost.write_flops, learner.cost.flops - by["setup"])
    # training FLOPs are booked per trained token, wake and sleep together
    assert math.isclose(by["wake"] + by["sleep"], learner.flops_per_token * learner.cost.trained_tokens)
    slower = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, paraphrase=False, rehearsal=False, budget_exponent=0.5), gate)
    slower.observe(0, [Observation("a", 0, a), Observation("a2", 0, a), Observation("b", 0, b), Observation("b2", 0, b)])
    slower.end_episode(0)
    assert slower.written_ids == {"a", "b"}
    # budget_exponent 0.5: 200 x 0.5 ** 0.5 = 141 tokens (wake 42 and sleep 98, each rounded down)
    assert slower.cost.trained_tokens == int(200 * 0.5 ** 0.5 * 0.3) + int(200 * 0.5 ** 0.5 * 0.7)


def test_min_budget_share_floors_the_budget_but_an_empty_write_spends_nothing(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=200, batch_size=2, seed=0)
    gate = GateConfig(familiarity="units", min_unit_surprise=-1, min_learnability=-1, max_nats_per_byte=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, paraphrase=False, rehearsal=False,
                                              min_budget_share=0.75), gate)
    a, b = "Mira Talvik was born in Oskeln.", "Pell Odrin works for Vask."
    learner.observe(0, [Observation("a", 0, a), Observation("a2", 0, a), Observation("b", 0, b), Observation("b2", 0, b)])
    learner.end_episode(0)
    # half written, floored at 0.75: 150 tokens (wake 45, sleep 105)
    assert learner.share == 0.5
    assert learner.cost.trained_tokens == int(200 * 0.75 * 0.3) + int(200 * 0.75 * 0.7)
    # an episode of duplicates only: nothing written, no training in wake or sleep, floor or not
    before = learner.cost.trained_tokens
    learner.observe(1, [Observation("a3", 1, a), Observation("b3", 1, b)])
    learner.end_episode(1)
    assert learner.share == 0.0 and learner.written_ids == {"a", "b"}
    assert learner.cost.trained_tokens == before


def test_familiarity_is_measured_on_the_base_not_on_what_was_written(schooled):
    """Writing a fact must not make its later restatements look 'known' to the gate."""
    from c2w.fast import lm_loss
    from c2w.learners.train import collate

    torch.manual_seed(0)  # the adapter's init (seeds 0-3 pass), not whatever tests ran before left in the global RNG
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    params = bank.fast_params()
    cfg_base = GateConfig(familiarity="units", min_novelty=0, familiarity_on_base=True)
    cfg_cur = GateConfig(familiarity="units", min_novelty=0, familiarity_on_base=False)
    before = score_texts(bank.model, schooled.tokenizer, params, [NEW], [], cfg_base)[0].unit_surprise
    ids, att = collate(schooled.tokenizer, [NEW], 64, schooled.device)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        lm_loss(bank.model, ids, att, att.bool()).backward()
        opt.step()
    on_base = score_texts(bank.model, schooled.tokenizer, params, [NEW], [], cfg_base)[0]
    on_current = score_texts(bank.model, schooled.tokenizer, params, [NEW], [], cfg_cur)[0]
    assert on_base.unit_surprise == pytest.approx(before, abs=1e-4)
    assert on_current.unit_surprise < before - 1.0  # the adapter learned it: the current model finds it familiar
    # surprise is the current model's mean NLL (the trial step's forward), familiarity the base's
    from c2w.memory.gate import text_signals
    (cur_nll, _, _), = text_signals(bank.model, schooled.tokenizer, [NEW])
    with bank.model.disable_adapter():
        (base_nll, _, _), = text_signals(bank.model, schooled.tokenizer, [NEW])
    assert on_base.surprise == pytest.approx(cur_nll, abs=1e-4) and cur_nll < base_nll - 0.5


@pytest.mark.parametrize("rule", ["units", "words"])
def test_both_familiarity_rules_find_the_known_fact_more_familiar(schooled, rule):
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    cfg = GateConfig(familiarity=rule, min_unit_surprise=-1, min_word_surprise=-1, min_novelty=0, min_learnability=-1, max_nats_per_byte=0)
    known, new = score_texts(bank.model, schooled.tokenizer, bank.fast_params(), [KNOWN, NEW], [], cfg)
    assert new.unit_surprise > known.unit_surprise


def test_an_unknown_familiarity_rule_is_refused(schooled):
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    with pytest.raises(ValueError, match="familiarity rule"):
        score_texts(bank.model, schooled.tokenizer, bank.fast_params(), [NEW], [], GateConfig(familiarity="vibes"))


def test_rehearsal_openers_mix_fact_asking_prompts_in():
    from c2w.memory.rehearsal import FACT_OPENERS, OPENERS, openers

    assert openers(False) == OPENERS
    mixed = openers(True)
    assert set(mixed) == set(OPENERS) | set(FACT_OPENERS) and len(mixed) == len(OPENERS) + len(FACT_OPENERS)
    assert set(mixed[1:16:2]) == set(FACT_OPENERS)  # interleaved, so a small sample holds both kinds


def test_cloze_pairs_ask_for_every_name_from_the_rest_of_its_sentence():
    from c2w.memory.gate import cloze_pairs

    pairs = cloze_pairs(["Kampala is the capital city of Uganda.", "no names here"])
    assert pairs == [(0, "Question: What is the capital city of Uganda?\nAnswer:", " Kampala"),
                     (0, "Question: Kampala is the capital city of what?\nAnswer:", " Uganda")]


@pytest.fixture(scope="module")
def schooled_qa(tiny):
    """The tiny model schooled on templated facts, KNOWN among them, and on their question views:
    it can answer questions about what it knows, which is what the `cloze` rule asks of it."""
    from c2w.memory.views import mechanical_views

    corpus = CORPUS + [v for s in CORPUS for v in mechanical_views(s) if v.startswith("Question:")]
    return school(tiny, corpus, len(corpus) * 20 * 30, 8, "tiny-schooled-qa")


def test_the_cloze_rule_finds_the_known_fact_familiar_and_the_new_one_not(schooled_qa):
    from c2w.memory.gate import cloze_familiarity

    known, new, none = cloze_familiarity(schooled_qa.model, schooled_qa.tokenizer, [KNOWN, NEW, "no names here"])
    assert new > known + 2.0  # every part of the known fact is predictable from the rest; not so the new one
    assert none == float("inf")  # nothing to ask about: never "known"
    cfg = GateConfig(familiarity="cloze", cloze_threshold=(known + new) / 2, min_novelty=0, min_learnability=-1, max_nats_per_byte=0)
    bank = AdapterBank(schooled_qa.model, lora_config(LearnerConfig()))
    k, n, z = score_texts(bank.model, schooled_qa.tokenizer, bank.fast_params(), [KNOWN, NEW, NOISE], [], cfg)
    assert (k.reason, n.reason) == ("known", "write")
    assert z.unit_surprise == float("inf")  # noise names nothing: never "known" (learnability's business)


@pytest.mark.parametrize("wake_rehearsal", [False, True])
def test_rehearsal_never_overruns_the_budget(tiny, wake_rehearsal):
    # a budget smaller than one rehearsal batch: the batch must be cut, not trained whole
    cfg = LearnerConfig(lr=1e-3, token_budget=60, batch_size=2, seed=0)
    c2w = C2WConfig(router_calibration=6, gate=False, paraphrase=False, rehearsal=True, n_rehearsal=4, rehearsal_batch=4, wake_rehearsal=wake_rehearsal)
    learner = C2WLearner(tiny, cfg, c2w)
    assert sum(len(s) for s in learner.rehearsal[0]) > 60 * (1 - c2w.wake_share)  # the batch alone would overrun sleep
    learner.observe(0, [Observation("a", 0, "Mira Talvik was born in Oskeln.")])
    learner.end_episode(0)
    assert 0 < learner.cost.trained_tokens <= 60


def test_cloze_familiarity_keeps_a_long_questions_end(tiny):
    from c2w.memory.gate import cloze_familiarity

    long = "Arlen " + "very " * 200 + "old was born in Ardon."
    (fam,) = cloze_familiarity(tiny.model, tiny.tokenizer, [long], max_len=32)
    assert 0 < fam < float("inf")  # scored within 32 tokens instead of failing or reading 400


def test_neighbour_prompts_ask_the_facts_questions_about_other_names():
    from c2w.memory.rehearsal import neighbour_prompts

    rng = random.Random(0)
    ps = neighbour_prompts("Mira Talvik was born in Oskeln. She works at Dernoln Mills.", ["Berlin"], rng, 10)
    # each span asked as a question, and the sentence cut before it, with the other name swapped;
    # a cut with nothing left to swap, and the one-name second sentence, give none
    assert sorted(ps) == sorted(["Question: Berlin was born in what?\nAnswer:", "Berlin was born in",
                                 "Question: What was born in Berlin?\nAnswer:"])
    assert len(neighbour_prompts("Mira Talvik was born in Oskeln.", ["Berlin"], rng, 1)) == 1
    assert neighbour_prompts("Mira Talvik works as a potter.", ["Berlin"], rng, 4) == []  # one span: nothing to swap
    assert neighbour_prompts("Mira Talvik was born in Oskeln.", [], rng, 4) == []


def test_known_names_are_names_inside_sentences(tiny):
    from c2w.memory.rehearsal import known_names

    ids = tiny.tokenizer("Once upon a time Joseph Sobka lived in Berlin. Many people came to Berlin.",
                         return_tensors="pt").input_ids[0]
    assert known_names(tiny.tokenizer, [ids]) == ["Joseph Sobka", "Berlin"]


def test_neighbour_rehearsal_distils_the_base_on_neighbours_within_budget(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=400, batch_size=2, seed=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, gate=False, paraphrase=False, rehearsal=True, n_rehearsal=4, neighbour_rehearsal=True))
    learner._names = ["Berlin"]
    learner.observe(0, [Observation("a", 0, "Mira Talvik was born in Oskeln.")])
    assert len(learner.neighbours) == C2WConfig().neighbours_per_text
    for seq, (v, i) in learner.neighbours:
        assert "Berlin" in tiny.tokenizer.decode(seq) and v.shape[0] == len(seq)
    learner.end_episode(0)
    assert 0 < learner.cost.trained_tokens <= 400


def test_lora_targets_take_a_comma_list_and_c2w_runs_on_mlp_only_adapters(tiny):
    cfg = LearnerConfig(lr=1e-3, token_budget=200, batch_size=2, seed=0, lora_targets="gate_proj, up_proj,down_proj")
    assert sorted(lora_config(cfg).target_modules) == ["down_proj", "gate_proj", "up_proj"]
    learner = C2WLearner(tiny, cfg, C2WConfig(router_calibration=6, gate=False, paraphrase=False, n_rehearsal=2))
    learner.observe(0, [Observation("a", 0, "Mira Talvik was born in Oskeln.")])
    learner.end_episode(0)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in learner.model.named_parameters() if ".lora_A" in n}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}
    assert 0 < learner.cost.trained_tokens <= 200


def test_the_gate_module_imports_on_its_own():
    """c2w.learners imports the gate; the gate must not need c2w.learners imported first."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import c2w.memory.gate"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_progress_points_sit_at_fractions_of_the_episode_budget_sleep_included(tiny):
    """Learning speed compares learners at the same share of their episode's tokens: with the online
    write a 0.25 share of the budget, the points at 1/3 and 2/3 fall inside the sleep."""
    cfg = LearnerConfig(lr=1e-3, token_budget=240, batch_size=2, seed=0, progress_points=2)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, router_calibration=6, wake_share=0.25))
    obs = [Observation("a", 0, "Mira Talvik was born in Oskeln."), Observation("b", 0, "Pell Odrin works for Vask.")]
    in_write = list(learner.observe_steps(0, obs))
    after_write = learner.cost.trained_tokens
    in_sleep = list(learner.end_episode_steps(0))
    assert in_write == [] and after_write == 60
    assert [tokens for _, tokens in in_sleep] == [pytest.approx(80, abs=30), pytest.approx(160, abs=30)]
    assert all(tokens >= target for (_, tokens), target in zip(in_sleep, (80, 160)))
    assert learner.cost.trained_tokens == 240 and learner.sleeps == 1
    # without a sleep, every point is in the write, as for the baselines
    flat = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, router_calibration=6, sleep=False))
    assert [t for _, t in flat.observe_steps(0, obs)] == [pytest.approx(80, abs=30), pytest.approx(160, abs=30)]
    assert list(flat.end_episode_steps(0)) == []


def test_a_long_text_is_kept_and_replayed_as_windows_a_write_step_reaches(tiny):
    from c2w.learners.train import windows

    long = " ".join(["The old stone bridge over the valley was rebuilt."] * 6) + " Mira was born in Oskeln."
    cfg = LearnerConfig(lr=1e-3, token_budget=200, max_len=32, batch_size=2, seed=0)
    learner = C2WLearner(tiny, cfg, C2WConfig(gate=False, paraphrase=False, rehearsal=False, recombination=False,
                                              router_calibration=6))
    learner.observe(0, [Observation("f1", 0, long)])
    (entry,) = learner.buffer.entries
    assert entry.text == long and entry.views == windows(tiny.tokenizer, [long], 32)
    assert len(entry.views) > 1 and entry.views[-1].endswith("Mira was born in Oskeln.")


def test_a_text_of_several_sentences_is_tried_sentence_by_sentence(schooled):
    """One trial step spread over many facts moves each less: a document of new facts must not
    look unlearnable for its length. Its learnability is the median over (at most 8, evenly
    spaced) sentences, each stepped on alone; a one-sentence text is tried whole, as before."""
    from c2w.memory.gate import TRIAL_SENTENCES, learnability, text_learnability, trial_pieces

    facts = [f"{n} Vilsk was born in the town of {t}." for n, t in zip(NAMES, TOWNS)]  # 12 sentences
    doc = " ".join(facts)
    pieces = trial_pieces(doc)
    assert len(pieces) == TRIAL_SENTENCES and pieces[0] == facts[0] and pieces[-1] == facts[-1]
    assert len(set(pieces)) == TRIAL_SENTENCES and trial_pieces(NEW) == [NEW]
    assert trial_pieces("- Arlen lives in Ardon\n- Bosk lives in Brisk\n") == ["- Arlen lives in Ardon", "- Bosk lives in Brisk"]
    assert trial_pieces("Summary\n" + facts[0] + "\n" + facts[1]) == facts[:2]  # a heading is not tried
    bank = AdapterBank(schooled.model, lora_config(LearnerConfig()))
    m, tok, params, lr = bank.model, schooled.tokenizer, bank.fast_params(), GateConfig().trial_lr
    each = sorted(learnability(m, tok, params, p, lr)[0] for p in pieces)
    assert text_learnability(m, tok, params, doc, lr)[0] == pytest.approx((each[3] + each[4]) / 2)
    assert text_learnability(m, tok, params, NEW, lr) == learnability(m, tok, params, NEW, lr)
    # the gate decides on the median, not on one step over the whole document (on this tiny model,
    # schooled on this very template, the whole one moves more; on SmolLM2 it moves less: 0.009
    # against 0.022 for 20-fact documents, BENCHMARKS.md session 21)
    whole = learnability(m, tok, params, doc, lr)[0]
    (g,) = score_texts(m, tok, params, [doc], [], GateConfig(familiarity="units", min_unit_surprise=-1, max_nats_per_byte=0))
    assert g.learnability == pytest.approx((each[3] + each[4]) / 2) != pytest.approx(whole)
