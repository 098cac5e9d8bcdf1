"""Compare c2w design variants on the validation seed only (never a reported seed).

Each variant is NAME=JSON with keys from C2WConfig, GateConfig (prefixed "gate."), or "lr":

    .venv/bin/python scripts/c2w_sweep.py 'base={}' 'qa={"view_style": "cloze-qa"}' 'lr3={"lr": 0.003}'

Prints and writes (runs/c2w-sweep.json) each variant's final ACC, learning accuracy, BWT,
forgetting, control accuracy, general-text KL, update metrics and wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from c2w.bench import BenchConfig, build_stream, learner_config, prepare
from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate, run_learner
from c2w.learners.c2w import C2WConfig, C2WLearner
from c2w.memory.gate import GateConfig
from c2w.streams.controls import add_controls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=JSON overrides")
    ap.add_argument("--stress", type=int, default=0, help="gate-stress records per episode")
    ap.add_argument("--out", default="runs/c2w-sweep.json", help="where results are written")
    a = ap.parse_args()
    cfg = BenchConfig(methods=["c2w"], stress=a.stress).resolved()
    bb, controls, passages, base_lp = prepare(cfg)
    stream = add_controls(build_stream(cfg, cfg.validation_seed), controls)
    ctx = EvalContext(stream, build_probeset(stream), cfg.probe_format, passages, base_lp)
    base = evaluate(bb.model, bb.tokenizer, ctx)
    roles = {r.id: r.role for r in stream.records}
    rows = {}
    for v in a.variants:
        name, js = v.split("=", 1)
        o = json.loads(js)
        lr = o.pop("lr", None)
        gate = GateConfig(**{k[5:]: o.pop(k) for k in list(o) if k.startswith("gate.")})
        t0 = time.perf_counter()
        learner = C2WLearner(bb, learner_config(cfg, "c2w", cfg.validation_seed, lr), dataclasses.replace(C2WConfig(), **o), gate)
        r = run_learner(learner, ctx, base)
        rows[name] = {"overrides": json.loads(js), "acc": r["acc"], "learning_accuracy": r["learning_accuracy"],
                      "bwt": r["bwt"], "forgetting": r["forgetting"], "control_acc": r["locality"]["control_acc"],
                      "kl": r["locality"]["kl"], "updates": r["updates"], "gate": r["gate"],
                      "matrix": r["accuracy_matrix"], "wall_s": time.perf_counter() - t0,
                      "gate_log": [{**g, "role": roles[g["id"]]} for g in learner.gate_log]}
        print(name, json.dumps({k: rows[name][k] for k in ("acc", "learning_accuracy", "bwt", "forgetting",
                                                          "control_acc", "kl", "updates", "wall_s")}), flush=True)
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
