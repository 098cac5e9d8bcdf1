"""The one small interface every continual-learning method implements (Mammoth style).

The runner gives a learner only `Observation`s (id, episode, text). It never sees roles, probes or
`replaces`; those stay with the evaluator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import torch

from c2w.backbone import Backbone
from c2w.streams.records import Observation

# Writes are generators that yield (write steps, trained tokens) at a few points of the budget.
# The runner measures learning speed there and resumes the write: the learner is handed nothing
# but Observations, not even a callback that could lead back to the evaluator's data.
Progress = Iterator[tuple[int, int]]


@dataclass
class LearnerConfig:
    lr: float = field(default=1e-3, metadata={"help": "learning rate of the write optimiser (AdamW)"})
    token_budget: int = field(default=3000, metadata={"help": "trained tokens per episode, replay and sleep included"})
    batch_size: int = field(default=8, metadata={"help": "texts per write step"})
    max_len: int = field(default=128, metadata={"help": "tokens kept per training text"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_targets: str = field(default="all-linear", metadata={"help": "PEFT target_modules"})
    replay_fraction: float = field(default=0.5, metadata={"help": "share of each batch drawn from the replay buffer"})
    buffer_size: int = field(default=256, metadata={"help": "replay buffer capacity in texts (reservoir sampling)"})
    rag_k: int = field(default=2, metadata={"help": "passages retrieved into the prompt by `rag`"})
    progress_points: int = field(default=3, metadata={"help": "learning-speed probes per episode, inside the write"})
    seed: int = 0


@dataclass
class Cost:
    trained_tokens: int = 0
    train_steps: int = 0
    train_s: float = 0.0
    flops: float = 0.0
    trainable_params: int = 0


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

    @property
    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def contextualize(self, prompts: list[str]) -> list[str]:
        """Rewrite probe prompts before scoring (only retrieval methods do)."""
        return prompts

    def state_bytes(self) -> int:
        """Bytes of state this method stores beyond the frozen backbone."""
        return 0
