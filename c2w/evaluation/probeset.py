"""Which probes measure what: the accuracy matrix, updates, controls. Built from the stream by the
evaluator alone; learners never see any of it."""

from __future__ import annotations

from dataclasses import dataclass

from c2w.streams.records import Probe, Stream


@dataclass(frozen=True)
class Item:
    record_id: str
    episode: int
    kind: str  # "matrix" | "stale" (old answer of a replaced fact) | "control"
    probe: Probe


@dataclass
class ProbeSet:
    items: list[Item]
    n_episodes: int
    updates: list[tuple[str, str]]  # (new record id, replaced record id)

    def of(self, kind: str, episode: int | None = None) -> list[int]:
        return [k for k, it in enumerate(self.items) if it.kind == kind and (episode is None or it.episode == episode)]


def build_probeset(stream: Stream) -> ProbeSet:
    """Matrix items: probes of learn records that no later record replaces (a replaced fact's old
    answer is stale, so it is scored apart as a `stale` item). Controls: probes of control records."""
    replaced = {r.replaces: r.id for r in stream.records if r.replaces}
    items: list[Item] = []
    for r in stream.records:
        kind = {"learn": "stale" if r.id in replaced else "matrix", "control": "control"}.get(r.role)
        if kind:
            items.extend(Item(r.id, r.episode, kind, p) for p in r.probes)
    return ProbeSet(items, stream.n_episodes, [(new, old) for old, new in replaced.items()])
