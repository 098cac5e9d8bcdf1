"""Continual-learning methods, one file each, behind the `Learner` interface."""

from c2w.config import BASELINES, C2W_ABLATIONS
from c2w.learners.base import Cost, Learner, LearnerConfig
from c2w.learners.c2w import C2W_METHODS
from c2w.learners.full_ft import FullFTLearner
from c2w.learners.lora import LoraLearner
from c2w.learners.lora_replay import LoraReplayLearner
from c2w.learners.none import NoneLearner
from c2w.learners.rag import RagLearner

METHODS: dict[str, type[Learner]] = {cls.name: cls for cls in
                                     (NoneLearner, FullFTLearner, LoraLearner, LoraReplayLearner, RagLearner)}
METHODS.update(C2W_METHODS)


def make_learner(name: str, backbone, cfg: LearnerConfig) -> Learner:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](backbone, cfg)


__all__ = ["Cost", "Learner", "LearnerConfig", "METHODS", "BASELINES", "C2W_ABLATIONS", "make_learner"]
