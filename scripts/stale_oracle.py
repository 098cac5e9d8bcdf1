"""Diagnostic, not a method: how much of c2w's stale-answer rate comes from replaying the old fact?

A learner never sees `replaces` (records.py). This script gives it anyway, as an oracle: when c2w
writes a record that replaces an older one, the older record's entry leaves the episodic buffer,
so sleep no longer replays the stale answer (the slow adapter still holds what earlier sleeps
consolidated). If stale answers barely fall even then, a detector of updates from text alone is
not worth building; if they fall a lot, the gap between this and c2w is what such a detector can win.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/stale_oracle.py --seeds 1000,1001,1002 --out runs/stale-oracle.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from c2w.bench import BenchConfig, build_stream, learner_config, prepare
from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate, run_learner
from c2w.learners.c2w import C2WLearner
from c2w.streams.controls import add_controls

from c2w_sweep import seeds_arg


class OracleEvict(C2WLearner):
    """c2w, plus: a written record that replaces an older one evicts the older one's buffer entry."""

    name = "c2w-oracle-evict"
    replaces: dict[str, str] = {}

    def observe_steps(self, episode, observations):
        yield from super().observe_steps(episode, observations)
        gone = {self.replaces[i] for i in self.written_ids if i in self.replaces}
        self.evicted = getattr(self, "evicted", 0) + sum(e.id in gone for e in self.buffer.entries)
        self.buffer.entries = [e for e in self.buffer.entries if e.id not in gone]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=seeds_arg, default=[1000, 1001, 1002], help="validation seeds (>= 1000)")
    ap.add_argument("--out", default="runs/stale-oracle.json", help="where results are written")
    ap.add_argument("--model", default="smollm2", help="backbone ('tiny' for a smoke run)")
    ap.add_argument("--oracle-only", action="store_true",
                    help="skip plain c2w (the same numbers as c2w_sweep.py 'default={}' on these seeds)")
    a = ap.parse_args()
    cfg = BenchConfig(methods=["c2w"], model=a.model).resolved()
    bb, controls, passages, base_lp = prepare(cfg)
    rows: dict = {"c2w": {}, "oracle-evict": {}}
    for seed in a.seeds:
        stream = add_controls(build_stream(cfg, seed), controls)
        ctx = EvalContext(stream, build_probeset(stream), cfg.probe_format, passages, base_lp)
        base = evaluate(bb.model, bb.tokenizer, ctx)
        for name, cls in (("c2w", C2WLearner), ("oracle-evict", OracleEvict))[int(a.oracle_only):]:
            t0 = time.perf_counter()
            learner = cls(bb, learner_config(cfg, "c2w", seed))
            learner.replaces = {r.id: r.replaces for r in stream.records if r.replaces}
            r = run_learner(learner, ctx, base)
            rows[name][seed] = {"acc": r["acc"], "forgetting": r["forgetting"], "learning_accuracy": r["learning_accuracy"],
                                **r["updates"], "evicted": getattr(learner, "evicted", 0), "wall_s": time.perf_counter() - t0}
            print(f"seed {seed} {name}", json.dumps(rows[name][seed]), flush=True)
            json.dump(rows, open(a.out, "w"), indent=1)
    for name, per in rows.items():
        if not per:
            continue
        keys = ("acc", "forgetting", "new_answer_acc", "stale_persistence")
        print(name, ", ".join(f"{k} {statistics.fmean(p[k] for p in per.values()):.3f}" for k in keys))


if __name__ == "__main__":
    main()
