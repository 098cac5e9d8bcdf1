"""Which probes measure what: the accuracy matrix, updates, controls. Built from the stream by the
evaluator alone; learners never see any of it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from c2w.evaluation.scoring import contains_words, normalise
from c2w.streams.records import Probe, Stream


@dataclass(frozen=True)
class Item:
    record_id: str
    episode: int
    kind: str  # "matrix" | "stale" (old answer of a replaced fact) | "control"
    probe: Probe
    retired_by: str | None = None  # a stale item: the id of the record that changed its answer


@dataclass
class ProbeSet:
    items: list[Item]
    n_episodes: int
    updates: list[tuple[str, str]]  # (new record id, replaced record id)
    # old probes a replacing record kept (it asks other old prompts again) though its text drops their answer:
    # (record id, probe index, replacing record id); a later link may still retire them
    unstated: list[tuple[str, int, str]] = field(default_factory=list)

    def of(self, kind: str, episode: int | None = None) -> list[int]:
        return [k for k, it in enumerate(self.items) if it.kind == kind and (episode is None or it.episode == episode)]

    def update_items(self) -> list[tuple[list[int], list[int]]]:
        """Per update (as `updates`): the new record's matrix items and the stale items it retired. An
        update is measured where both are non-empty."""
        mine, retired = defaultdict(list), defaultdict(list)
        for k, it in enumerate(self.items):
            if it.kind == "matrix":
                mine[it.record_id].append(k)
            elif it.kind == "stale":
                retired[it.retired_by].append(k)
        return [(mine[new], retired[new]) for new, _ in self.updates]


def build_probeset(stream: Stream) -> ProbeSet:
    """Matrix items: probes of learn records, except the old answers a later record replaces, which are
    scored apart as `stale` items. Controls: probes of control records.

    A record that replaces another retires only the old probes whose answers it changes:
    - where it asks an old probe's prompt again (case, punctuation and spacing aside), that probe is
      stale when the answer differs, and any old probe whose prompt it does not ask stays live (a
      partial update, "now lives in Prell", leaves the person's employer alone);
    - where it asks none of the old prompts, an old probe of the record it names is stale when the
      old answer no longer appears in its text (the fallback for notes that ask in other words).
    An old probe whose answer still holds stays in the matrix, in its own episode. Records that
    replace an id already replaced form a chain: each updates the latest record of it (`updates`
    lists each link) and may retire, by asking their prompts again, what earlier links kept."""
    succ: dict[str, str] = {}  # record id -> the record that replaced it
    by_id = {r.id: r for r in stream.records}
    stale: dict[tuple[str, int], str] = {}  # (record id, probe index) -> the record that retired it
    chain: dict[str, list[str]] = {}  # a chain's latest record -> every record in it, oldest first
    updates: list[tuple[str, str]] = []
    unstated: dict[tuple[str, int], str] = {}  # (record id, probe index) -> the first record that dropped its answer
    for r in stream.records:  # file order: a record replaces one on an earlier line (validated)
        if not r.replaces or r.replaces not in by_id:
            continue
        old = r.replaces
        while old in succ:
            old = succ[old]
        succ[old] = r.id
        updates.append((r.id, old))
        links = chain[r.id] = chain.pop(old, [old]) + [r.id]
        asked = {_key(p.prompt): normalise(p.answer) for p in r.probes}
        live = [(rid, k, p) for rid in links[:-1] for k, p in enumerate(by_id[rid].probes) if (rid, k) not in stale]
        reasks = any(_key(p.prompt) in asked for _, _, p in live)
        for rid, k, p in live:
            if reasks:
                new_answer = asked.get(_key(p.prompt))
                changed = new_answer is not None and normalise(p.answer) != new_answer
            else:
                changed = rid == r.replaces and not contains_words(r.text, p.answer)
            if changed:
                stale[(rid, k)] = r.id
            elif reasks and _key(p.prompt) not in asked and not contains_words(r.text, p.answer) \
                    and by_id[rid].role == "learn":
                unstated.setdefault((rid, k), r.id)
    items: list[Item] = []
    for r in stream.records:
        if r.role == "control":
            items.extend(Item(r.id, r.episode, "control", p) for p in r.probes)
        elif r.role == "learn":
            items.extend(Item(r.id, r.episode, "stale", p, stale[(r.id, k)]) if (r.id, k) in stale else
                         Item(r.id, r.episode, "matrix", p) for k, p in enumerate(r.probes))
    return ProbeSet(items, stream.n_episodes, updates, [(*u, by) for u, by in unstated.items() if u not in stale])


def _key(prompt: str) -> str:
    return normalise(prompt, numbers=False)
