"""Episodic buffer: what was written, with its gate scores and when.

Bounded: when full, the entry with the lowest replay priority is evicted (priority = its NLL under
the current model, refreshed at every sleep: a well-consolidated entry is the cheapest to lose;
ties go to the oldest). Entries are plain JSON so that the state directory can hold them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field


@dataclass
class Entry:
    id: str
    episode: int
    text: str
    views: list[str]
    surprise: float = 0.0
    learnability: float = 0.0
    priority: float = 1.0  # NLL of the text under the current model, refreshed at sleep
    replays: int = 0


@dataclass
class EpisodicBuffer:
    capacity: int = 512
    entries: list[Entry] = field(default_factory=list)

    def add(self, e: Entry) -> Entry | None:
        """Store e; return the evicted entry, if any."""
        self.entries.append(e)
        if len(self.entries) <= self.capacity:
            return None
        victim = min(range(len(self.entries) - 1), key=lambda k: (self.entries[k].priority, self.entries[k].episode))
        return self.entries.pop(victim)

    def sample(self, n: int, rng: random.Random, prioritised: bool = True) -> list[Entry]:
        """n entries with replacement, proportional to priority (or uniform)."""
        if not self.entries:
            return []
        w = [max(e.priority, 1e-3) for e in self.entries] if prioritised else None
        picked = rng.choices(self.entries, weights=w, k=n)
        for e in picked:
            e.replays += 1
        return picked

    def texts(self) -> list[str]:
        return [e.text for e in self.entries]

    def to_json(self) -> dict:
        return {"capacity": self.capacity, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict) -> "EpisodicBuffer":
        return cls(d["capacity"], [Entry(**e) for e in d["entries"]])

    def nbytes(self) -> int:
        return sum(len(e.text.encode()) + sum(len(v.encode()) for v in e.views) + 64 for e in self.entries)
