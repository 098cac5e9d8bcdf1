"""Diagnostic: do stale answers persist more than other old facts do?

`stale_persistence` alone rewards forgetting: a learner that keeps nothing keeps no stale answer
either. This reads a `c2w bench` results.json, rebuilds each reported seed's stream, and sets each
update's stale rate beside the final accuracy on the facts learned in the same episode as the
replaced one (never updated: the accuracy matrix's last row at that episode). A ratio near 1 means
the learner keeps an old answer as often as any other old fact: it has not learned that the update
supersedes it. Below 1, the update displaced the old answer.

    .venv/bin/python scripts/stale_retention.py runs/s16-abl-A [runs/... ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import fields
from pathlib import Path

from c2w.bench import BenchConfig, build_stream


def per_seed(results: dict) -> dict[str, list[tuple[float, float, int]]]:
    """{method: [(stale, same-episode retention, updates) per seed]}."""
    cfg = results["config"]
    bc = BenchConfig(**{f.name: cfg[f.name] for f in fields(BenchConfig) if f.name in cfg})
    out: dict[str, list[tuple[float, float, int]]] = {}
    for k, seed in enumerate(cfg["seeds_reported"]):
        stream = build_stream(bc, seed)
        episode = {r.id: r.episode for r in stream.records}
        replaced = {r.replaces for r in stream.records if r.replaces}
        # as the runner counts them: an update that is itself replaced later has no matrix items
        olds = [r.replaces for r in stream.records if r.replaces and r.id not in replaced]
        for name, m in results["methods"].items():
            stale = m["updates"]["stale_persistence"]["per_seed"][k]
            last = m["accuracy_matrix"]["per_seed"][k][-1]
            if not olds or stale is None:
                continue
            keep = statistics.mean(last[episode[o]] for o in olds)
            out.setdefault(name, []).append((stale, keep, len(olds)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="bench output folders (each with results.json)")
    rows: dict[str, list[tuple[float, float, int]]] = {}
    for d in ap.parse_args().runs:
        for name, v in per_seed(json.loads((Path(d) / "results.json").read_text())).items():
            rows.setdefault(name, []).extend(v)
    print("| method | seeds | updates | stale answers | same-episode facts kept | ratio |")
    print("|---|---|---|---|---|---|")
    for name, v in rows.items():
        s, k = statistics.mean(x[0] for x in v), statistics.mean(x[1] for x in v)
        ratio = f"{s / k:.2f}" if k else "-"
        print(f"| {name} | {len(v)} | {sum(x[2] for x in v)} | {s:.3f} | {k:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
