"""Decode the control probes (facts the base knows) before c2w writes anything and around every
sleep, on a validation stream: where and how the base's knowledge is lost.

    .venv/bin/python scripts/control_answers.py                 # seed 1000, c2w defaults
    .venv/bin/python scripts/control_answers.py --seed 1001 '{"rehearsal_batch": 2}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from c2w.bench import BenchConfig, build_stream, learner_config, prepare
from c2w.config import FIRST_VALIDATION_SEED
from c2w.evaluation.probeset import build_probeset
from c2w.evaluation.runner import EvalContext, evaluate, run_learner
from c2w.evaluation.scoring import score_probes
from c2w.learners.c2w import C2WConfig, C2WLearner
from c2w.streams.controls import add_controls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="?", default="{}", help="JSON of C2WConfig fields")
    ap.add_argument("--seed", type=int, default=FIRST_VALIDATION_SEED, help=f"validation stream seed (>= {FIRST_VALIDATION_SEED})")
    ap.add_argument("--model", default="smollm2", help="backbone ('tiny' for a smoke run)")
    a = ap.parse_args()
    if a.seed < FIRST_VALIDATION_SEED:
        ap.error(f"--seed must be a validation seed (>= {FIRST_VALIDATION_SEED}); reported streams are not for diagnosis")
    cfg = BenchConfig(methods=["c2w"], model=a.model).resolved()
    bb, controls, passages, base_lp = prepare(cfg)
    stream = add_controls(build_stream(cfg, a.seed), controls)
    ctx = EvalContext(stream, build_probeset(stream), cfg.probe_format, passages, base_lp)
    idx = ctx.probes.of("control")
    prompts = [ctx.probes.items[k].probe.prompt for k in idx]
    answers = [ctx.probes.items[k].probe.answer for k in idx]

    def show(model, tag: str) -> None:
        was = model.training
        model.eval()
        scores = score_probes(model, bb.tokenizer, prompts, answers, with_logprob=False)
        model.train(was)
        print(f"{tag}: {sum(s.correct for s in scores)} / {len(scores)}")
        for p, ans, s in zip(prompts, answers, scores):
            print(f"  {'ok ' if s.correct else 'BAD'} {p!r} -> {s.continuation[:40]!r} (answer {ans})")

    show(bb.model, "base")
    learner = C2WLearner(bb, learner_config(cfg, "c2w", a.seed), dataclasses.replace(C2WConfig(), **json.loads(a.overrides)))
    sleep = learner.sleep

    def sleep_and_show() -> None:
        show(learner.model, f"episode {learner.sleeps}, after its write, before sleep")
        sleep()
        show(learner.model, f"episode {learner.sleeps - 1}, after sleep")

    learner.sleep = sleep_and_show
    r = run_learner(learner, ctx, evaluate(bb.model, bb.tokenizer, ctx))
    print(f"final ACC {r['acc']:.3f}, control accuracy {r['locality']['control_acc']:.2f}")


if __name__ == "__main__":
    main()
