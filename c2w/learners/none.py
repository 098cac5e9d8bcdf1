"""`none`: the frozen base. Observes and writes nothing; the reference point of every metric."""

from __future__ import annotations

from c2w.learners.base import Learner


class NoneLearner(Learner):
    name = "none"
    writes_weights = False
    static = True

    def observe_steps(self, episode, observations):
        return iter(())

    @property
    def model(self):
        return self.backbone.model
