"""Print the write gate's signals for every observed record of a gate-stress stream, by role, on
the base model: the table its thresholds were chosen from (validation seed only).

    .venv/bin/python scripts/gate_signals.py            # seed 1000, 2 stress records of each kind
    .venv/bin/python scripts/gate_signals.py --seed 1001 --stress 3
"""

from __future__ import annotations

import argparse
import json

from c2w.backbone import load_backbone
from c2w.bench import BenchConfig, build_stream
from c2w.learners.base import LearnerConfig
from c2w.learners.lora import lora_config
from c2w.memory.bank import AdapterBank
from c2w.memory.gate import RULES, GateConfig, learnability, text_signals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1000, help="stream seed (keep it off the reported seeds)")
    ap.add_argument("--stress", type=int, default=2, help="noise, duplicate and known records per episode")
    ap.add_argument("--model", default="smollm2", help="backbone")
    ap.add_argument("--familiarity", default=GateConfig().familiarity, choices=list(RULES),
                    help=f"familiarity rule to print (default: the gate's, {GateConfig().familiarity})")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    a = ap.parse_args()
    cfg = BenchConfig(stress=a.stress, model=a.model).resolved()
    stream = build_stream(cfg, a.seed)
    bb = load_backbone(a.model, "cpu")
    bank = AdapterBank(bb.model, lora_config(LearnerConfig()), 128)  # the gate runs with adapters attached
    gate = GateConfig(familiarity=a.familiarity)
    recs = [r for r in stream.records if r.text.strip()]
    rows = []
    for r, (nll, ent, fam) in zip(recs, text_signals(bank.model, bb.tokenizer, [r.text for r in recs], rule=a.familiarity)):
        lrn, _ = learnability(bank.model, bb.tokenizer, bank.fast_params(), r.text, gate.trial_lr)
        rows.append({"role": r.role, "text": r.text, "surprise": nll, "uncertainty": ent, "familiarity": fam, "learnability": lrn})
    print(f"{'role':10s} {'surprise':>8s} {'familiar':>8s} {'learnab':>8s}  text")
    for row in sorted(rows, key=lambda x: (x["role"], x["familiarity"])):
        print(f"{row['role']:10s} {row['surprise']:8.2f} {row['familiarity']:8.1f} {row['learnability']:8.3f}  {row['text'][:60]}")
    print(f"thresholds: familiarity > {gate.familiarity_threshold} and learnability >= {gate.min_learnability}")
    if a.out:
        json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
