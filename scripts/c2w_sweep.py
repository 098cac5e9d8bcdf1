"""Compare c2w design variants on the validation seed only (never a reported seed).

Each variant is NAME=JSON with keys from C2WConfig, GateConfig (prefixed "gate."), LearnerConfig
(prefixed "learner.", e.g. "learner.lora_targets": "gate_proj,up_proj,down_proj"), or "lr":

    .venv/bin/python scripts/c2w_sweep.py 'base={}' 'qa={"view_style": "cloze-qa"}' 'lr3={"lr": 0.003}'
    .venv/bin/python scripts/c2w_sweep.py --seeds 1000,1001,1002 'c2w={}' 'no-orth={"orthogonal": 0}'

Prints and writes (runs/c2w-sweep.json) each variant's final ACC, learning accuracy, BWT,
forgetting, control accuracy, general-text KL, update metrics, gate log and wall time, per seed,
with mean and std over the seeds. One validation seed of the quick preset (24 facts, 12 controls)
ranked two of three design choices wrongly (BENCHMARKS.md): use three.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time

from c2w.bench import BenchConfig, build_stream, learner_config, prepare
from c2w.config import FIRST_VALIDATION_SEED
from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate, run_learner
from c2w.learners.c2w import C2WConfig, C2WLearner
from c2w.memory.gate import GateConfig
from c2w.streams.controls import add_controls


KEYS = ("acc", "learning_accuracy", "bwt", "forgetting", "control_acc", "kl", "auc")


def seeds_arg(text: str) -> list[int]:
    seeds = [int(x) for x in text.split(",") if x.strip()]
    if not seeds or min(seeds) < FIRST_VALIDATION_SEED:
        # reported seeds are 0..N-1: a design chosen on them would be tuned on the probes reported
        raise argparse.ArgumentTypeError(f"validation seeds must be >= {FIRST_VALIDATION_SEED}, got {text!r}")
    return seeds


def run_variant(bb, cfg, ctx, base, seed: int, overrides: dict) -> dict:
    o = dict(overrides)
    lr = o.pop("lr", None)
    gate = GateConfig(**{k[5:]: o.pop(k) for k in list(o) if k.startswith("gate.")})
    lc = dataclasses.replace(learner_config(cfg, "c2w", seed, lr), **{k[8:]: o.pop(k) for k in list(o) if k.startswith("learner.")})
    t0 = time.perf_counter()
    learner = C2WLearner(bb, lc, dataclasses.replace(C2WConfig(), **o), gate)
    r = run_learner(learner, ctx, base)
    return {"acc": r["acc"], "learning_accuracy": r["learning_accuracy"], "bwt": r["bwt"], "forgetting": r["forgetting"],
            "control_acc": r["locality"]["control_acc"], "kl": r["locality"]["kl"], "updates": r["updates"],
            "auc": r["learning_speed"]["auc"], "curve": r["learning_speed"]["acc"],
            "gate": r["gate"], "matrix": r["accuracy_matrix"], "wall_s": time.perf_counter() - t0,
            "flops": r["cost"]["flops"], "write_flops": r["cost"]["write_flops"], "flops_by": r["cost"]["flops_by"],
            "trained_tokens": r["cost"]["trained_tokens"],
            "gate_log": r.get("gate_log", []), "locality": r["locality"]}  # the runner adds each record's role


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="NAME=JSON overrides")
    ap.add_argument("--seeds", type=seeds_arg, default=[FIRST_VALIDATION_SEED],
                    help=f"comma list of validation seeds (>= {FIRST_VALIDATION_SEED}); with several, mean and std per variant")
    ap.add_argument("--stress", type=int, default=0, help="gate-stress records per episode")
    ap.add_argument("--episodes", type=int, help="override the preset's episodes")
    ap.add_argument("--facts-per-episode", type=int, help="override the preset's facts per episode")
    ap.add_argument("--token-budget", type=int, help="override the preset's trained tokens per episode")
    ap.add_argument("--update-fraction", type=float, help="override the preset's share of updates")
    ap.add_argument("--model", default="smollm2", help="backbone ('tiny' for a smoke run)")
    ap.add_argument("--out", default="runs/c2w-sweep.json", help="where results are written")
    a = ap.parse_args()
    variants = []
    for v in a.variants:  # parse all first: a typo fails before any model is loaded
        if "=" not in v:
            ap.error(f"variant {v!r} is not NAME=JSON")
        name, js = v.split("=", 1)
        try:
            variants.append((name, json.loads(js)))
        except json.JSONDecodeError as e:
            ap.error(f"variant {name!r}: bad JSON ({e})")
    cfg = BenchConfig(methods=["c2w"], stress=a.stress, model=a.model, episodes=a.episodes,
                      facts_per_episode=a.facts_per_episode, token_budget=a.token_budget,
                      update_fraction=a.update_fraction).resolved()
    bb, controls, passages, base_lp = prepare(cfg)
    rows: dict = {name: {"overrides": o, "per_seed": {}} for name, o in variants}
    for seed in a.seeds:  # one stream and one base evaluation per seed, shared by the variants
        stream = add_controls(build_stream(cfg, seed), controls)
        ctx = EvalContext(stream, build_probeset(stream), cfg.probe_format, passages, base_lp)
        base = evaluate(bb.model, bb.tokenizer, ctx)
        for name, o in variants:
            row = rows[name]
            row["per_seed"][seed] = run_variant(bb, cfg, ctx, base, seed, o)
            vals = {k: [x[k] for x in row["per_seed"].values() if x[k] is not None and math.isfinite(x[k])] for k in KEYS}
            row["mean"] = {k: statistics.fmean(v) if v else float("nan") for k, v in vals.items()}
            row["std"] = {k: statistics.pstdev(v) if v else float("nan") for k, v in vals.items()}
            print(f"seed {seed} {name}", json.dumps({k: row["per_seed"][seed][k] for k in KEYS}), flush=True)
            json.dump(rows, open(a.out, "w"), indent=1)
    for name, row in rows.items():
        print(f"{name} over seeds {a.seeds}: " + ", ".join(f"{k} {row['mean'][k]:.3f} ± {row['std'][k]:.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
