"""`none`: the frozen base. Observes and writes nothing; the reference point of every metric."""

from __future__ import annotations

from c2w.learners.base import Learner


class NoneLearner(Learner):
    name = "none"
    writes_weights = False

    def observe(self, episode, observations, progress=None) -> None:
        pass

    @property
    def model(self):
        return self.backbone.model
