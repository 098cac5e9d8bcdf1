"""How the router (c2w/memory/router.py) decides on real entities, where names are not new words.

Writes statements of real-world facts the base knows (capital, language, currency, continent of
real countries: streams/controls.py), then asks the router about three kinds of question:
  written   the written facts' own questions (should go through the adapters),
  related   other relations of a written country (shares the country's name),
  other     facts about countries nothing was written about (should go to the base).
On the built-in fictional streams every name is new; this is the harder case a real-data stream
can bring. Only the frozen base runs: no adapter is trained.

    .venv/bin/python scripts/router_stress.py [--written 24] [--seed 0] [--layer 4]
"""

from __future__ import annotations

import argparse
import random

import numpy as np

from c2w.backbone import load_backbone
from c2w.config import C2WConfig
from c2w.memory.rehearsal import openers, sample_rehearsal
from c2w.memory.router import Router, base_hidden
from c2w.streams.controls import known_facts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--written", type=int, default=24, help="facts written")
    ap.add_argument("--seed", type=int, default=0, help="which facts are written; calibration sample seed")
    ap.add_argument("--layer", type=int, default=C2WConfig().router_layer, help="router block")
    ap.add_argument("--model", default="smollm2", help="backbone")
    a = ap.parse_args()
    bb = load_backbone(a.model)
    m, tok = bb.model, bb.tokenizer
    seqs = sample_rehearsal(m, tok, C2WConfig().router_calibration, seed=a.seed + 1, prompts=openers(True))
    router = Router.calibrate(m, tok, [tok.decode(s) for s in seqs], a.layer)
    facts = known_facts()
    random.Random(a.seed).shuffle(facts)
    written = facts[: a.written]
    router.add(base_hidden(m, tok, [f.statement for f in written], a.layer))
    subjects = {f.subject for f in written}
    groups = {"written": written,
              "related": [f for f in facts[a.written:] if f.subject in subjects],
              "other": [f for f in facts[a.written:] if f.subject not in subjects]}
    print(f"fold thresholds {' '.join(f'{t:.3f}' for t in router.thresholds)}; e.g. written {written[0].statement!r}, asked {written[0].prompt!r}")
    print("| questions | n | sent through the adapters | score median | score max |")
    print("|---|---|---|---|---|")
    for name, fs in groups.items():
        s = np.array(router.score(base_hidden(m, tok, [f.prompt for f in fs], a.layer)))
        print(f"| {name} | {len(fs)} | {np.mean(s > 0):.2f} | {np.median(s):.3f} | {s.max():.3f} |")


if __name__ == "__main__":
    main()
