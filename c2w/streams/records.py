"""The stream data types.

A `Record` is what the evaluator knows about one line of a stream; an `Observation` is the only
part a learner is ever given (id, episode, text). Roles, probes and `replaces` never leave the
evaluator: see `Record.observation()`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

ROLES = ("learn", "control", "noise", "known", "duplicate")


@dataclass(frozen=True, slots=True)
class Probe:
    prompt: str
    answer: str
    form: str = ""  # e.g. "cloze" or "question"; free text for user streams


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    episode: int
    text: str
    probes: tuple[Probe, ...] = ()
    role: str = "learn"
    replaces: str | None = None
    line: int = 0  # 1-based line number in the source file (0 when built in memory)

    def observation(self) -> "Observation":
        return Observation(self.id, self.episode, self.text)

    @property
    def observed(self) -> bool:
        """Controls are never shown to a learner; every other role is."""
        return self.role != "control"

    def to_json(self) -> dict:
        d: dict = {"id": self.id, "episode": self.episode, "text": self.text,
                   "probes": [{"prompt": p.prompt, "answer": p.answer, **({"form": p.form} if p.form else {})}
                              for p in self.probes]}
        if self.role != "learn":
            d["role"] = self.role
        if self.replaces is not None:
            d["replaces"] = self.replaces
        return d


@dataclass(frozen=True, slots=True)
class Observation:
    """What a learner sees of a record. Nothing else is reachable from it (slots, no back-reference)."""

    id: str
    episode: int
    text: str


@dataclass(slots=True)
class Stream:
    records: list[Record]
    name: str = "stream"
    meta: dict = field(default_factory=dict)  # generator options, for provenance

    @property
    def n_episodes(self) -> int:
        return 1 + max((r.episode for r in self.records), default=-1)

    def fingerprint(self) -> str:
        """sha256 of the records' content (ids, episodes, texts, probes, roles, replaces; in order), first
        16 hex digits: two runs saw the same data only if these agree, whatever the file was called."""
        blob = json.dumps([r.to_json() for r in self.records], ensure_ascii=False, sort_keys=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def episode(self, i: int) -> list[Record]:
        return [r for r in self.records if r.episode == i]

    def observations(self, i: int) -> list[Observation]:
        return [r.observation() for r in self.episode(i) if r.observed]
