"""The one small interface every continual-learning method implements (Mammoth style).

The runner gives a learner only `Observation`s (id, episode, text). It never sees roles, probes or
`replaces`; those stay with the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from c2w.backbone import Backbone
from c2w.config import LearnerConfig  # noqa: F401  (re-exported: the learners take it from here)
from c2w.streams.records import Observation

# Writes are generators that yield (write steps, trained tokens) at a few points of the budget.
# The runner measures learning speed there and resumes the write: the learner is handed nothing
# but Observations, not even a callback that could lead back to the evaluator's data.
Progress = Iterator[tuple[int, int]]


@dataclass
class Cost:
    trained_tokens: int = 0
    train_steps: int = 0
    train_s: float = 0.0
    flops: float = 0.0  # everything, setup included
    trainable_params: int = 0
    # FLOPs by part ("setup", "gate", "views", "keys", "wake", "sleep", "priorities"); "setup" is
    # paid once when the learner is built, whatever the stream (the router's calibration).
    flops_by: dict = field(default_factory=dict)

    def add(self, flops: float, part: str) -> None:
        self.flops += flops
        self.flops_by[part] = self.flops_by.get(part, 0.0) + flops

    @property
    def write_flops(self) -> float:
        """What writing the stream cost: all FLOPs but the one-time setup."""
        return self.flops - self.flops_by.get("setup", 0.0)


class Learner:
    """observe an episode -> end-of-episode hook -> `model` (+ `contextualize`) for evaluation."""

    name: ClassVar[str] = "base"
    group: ClassVar[str] = "baseline"  # "baseline" | "reference" | "c2w"
    writes_weights: ClassVar[bool] = True
    static: ClassVar[bool] = False  # True: answers exactly as the base does (the runner reuses its scores)

    def __init__(self, backbone: Backbone, cfg: LearnerConfig):
        self.backbone, self.cfg = backbone, cfg
        self.tokenizer = backbone.tokenizer
        self.cost = Cost()
        self.written_ids: set[str] = set()

    # --- the interface -------------------------------------------------------------------------
    def observe_steps(self, episode: int, observations: list[Observation]) -> Progress:
        """Write what is worth writing from one episode; yield (steps, tokens) at progress points."""
        raise NotImplementedError

    def observe(self, episode: int, observations: list[Observation]) -> None:
        for _ in self.observe_steps(episode, observations):
            pass

    def end_episode(self, episode: int) -> None:
        pass

    def end_episode_steps(self, episode: int) -> Progress:
        """`end_episode`, for the runner: a learner whose episode end trains (c2w's sleep) yields
        (steps, tokens) at the progress points that fall there."""
        self.end_episode(episode)
        yield from ()

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def contextualize(self, prompts: list[str]) -> list[str]:
        """Rewrite probe prompts before scoring (only retrieval methods do)."""
        return prompts

    def route(self, prompts: list[str]) -> list[bool] | None:
        """Per input, whether it goes through the learned weights (True) or the frozen base (False).
        None: everything goes through `model` (all methods but a routed c2w)."""
        return None

    def state_bytes(self) -> int:
        """Bytes of state this method stores beyond the frozen backbone."""
        return 0
