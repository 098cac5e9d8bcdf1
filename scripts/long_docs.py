"""A stream of long documents: each episode's facts of the built-in generator joined into one
record (text in order, every fact's probes), no updates. It tests what one-sentence records
cannot: windows of long texts (learners.train.windows) and the gate's trial step on documents.

    .venv/bin/python scripts/long_docs.py runs/docs-s0.jsonl --seed 0     # 3 documents of 20 facts
    .venv/bin/c2w bench --stream runs/docs-s0.jsonl --token-budget 4800  # about 17 passes each

Seeds below 1000 for reported runs, 1000 and up for choosing anything (as for the generator).
"""

from __future__ import annotations

import argparse

from c2w.streams.fictional import FictionalConfig, generate_fictional
from c2w.streams.records import Record, Stream
from c2w.streams.validate import write_stream


def long_docs(seed: int, episodes: int = 3, facts: int = 20) -> Stream:
    s = generate_fictional(FictionalConfig(episodes=episodes, facts_per_episode=facts, update_fraction=0.0, seed=seed))
    docs = []
    for ep in range(s.n_episodes):
        learn = [r for r in s.episode(ep) if r.role == "learn"]
        docs.append(Record(f"doc{ep}", ep, " ".join(r.text for r in learn), tuple(p for r in learn for p in r.probes)))
    return Stream(docs, name="long-docs", meta={"generator": "scripts/long_docs.py", "seed": seed,
                                                 "episodes": episodes, "facts_per_doc": facts})


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="JSONL stream to write")
    ap.add_argument("--seed", type=int, default=0, help="generator seed (>= 1000: validation)")
    ap.add_argument("--episodes", type=int, default=3, help="documents, one per episode")
    ap.add_argument("--facts", type=int, default=20, help="facts per document")
    a = ap.parse_args()
    write_stream(long_docs(a.seed, a.episodes, a.facts), a.out)
    print(f"wrote {a.out}")
