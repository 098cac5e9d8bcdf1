"""Smoke tests on the real SmolLM2-135M-Instruct weights (embedded GGUF; about a minute on CPU)."""

import pytest

from c2w.backbone import load_backbone
from c2w.evaluation.scoring import score_probes
from c2w.learners import LearnerConfig, make_learner
from c2w.streams.records import Observation


@pytest.fixture(scope="module")
def smol():
    return load_backbone("smollm2", device="cpu")


def test_base_knows_a_capital_and_not_a_fictional_fact(smol):
    s = score_probes(smol.model, smol.tokenizer, ["The capital of France is", "Mira Talvik was born in the harbour town of"],
                     ["Paris", "Oskeln"])
    assert s[0].correct and not s[1].correct
    assert smol.n_params > 100_000_000


def test_a_lora_write_makes_the_real_model_recall_the_fact(smol):
    fact = Observation("f1", 0, "Mira Talvik was born in the harbour town of Oskeln.")
    learner = make_learner("lora", smol, LearnerConfig(lr=1e-3, token_budget=12 * 14, batch_size=1, seed=0))
    learner.observe(0, [fact])
    s = score_probes(learner.model, smol.tokenizer, ["Mira Talvik was born in the harbour town of"], ["Oskeln"])[0]
    assert s.correct, s.continuation
