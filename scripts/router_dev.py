"""Router design dev set: routing decisions only, no adapter trained, no country and no control.

Two sources, neither of which is reported by the bench or by scripts/router_stress.py (countries):
  real      statements about real books, chemical elements and paintings the base has heard of,
            written for half of each kind; then questions about the written ones (should go through
            the adapters) and about the other half (should go to the base);
  fictional the observed learn texts of the built-in stream on validation seeds (>= 1000), written
            all at once; then their probes (on) and general-text passages (off).
The chosen blocks of one forward are scored under three threshold rules, per calibration seed:
  one        one held-out third of the calibration texts (session 12's router);
  fold-mean  three folds, mean of (margin - fold threshold) > 0 (router.py since session 13);
  fold-all   three folds, every fold's margin above its threshold.

    .venv/bin/python scripts/router_dev.py [--seeds 1005,1006] [--layers 2,4,6,8]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from c2w.backbone import load_backbone
from c2w.config import C2WConfig
from c2w.memory.rehearsal import openers, sample_rehearsal
from c2w.streams.fictional import FictionalConfig, generate_fictional
from c2w.streams.general_text import general_text

BOOKS = [("Pride and Prejudice", "Jane Austen"), ("Moby-Dick", "Herman Melville"), ("War and Peace", "Leo Tolstoy"),
         ("Hamlet", "William Shakespeare"), ("The Odyssey", "Homer"), ("Don Quixote", "Miguel de Cervantes"),
         ("Great Expectations", "Charles Dickens"), ("The Great Gatsby", "F. Scott Fitzgerald"),
         ("Frankenstein", "Mary Shelley"), ("Ulysses", "James Joyce"), ("Les Miserables", "Victor Hugo"),
         ("The Divine Comedy", "Dante Alighieri"), ("Crime and Punishment", "Fyodor Dostoevsky"),
         ("Nineteen Eighty-Four", "George Orwell"), ("The Old Man and the Sea", "Ernest Hemingway"),
         ("Jane Eyre", "Charlotte Bronte")]
ELEMENTS = [("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("potassium", "K"), ("lead", "Pb"),
            ("copper", "Cu"), ("tin", "Sn"), ("mercury", "Hg"), ("helium", "He"), ("oxygen", "O"), ("carbon", "C"),
            ("nitrogen", "N"), ("calcium", "Ca"), ("zinc", "Zn"), ("uranium", "U")]
PAINTINGS = [("the Mona Lisa", "Leonardo da Vinci"), ("The Starry Night", "Vincent van Gogh"),
             ("Guernica", "Pablo Picasso"), ("The Scream", "Edvard Munch"), ("The Night Watch", "Rembrandt"),
             ("The Birth of Venus", "Sandro Botticelli"), ("Water Lilies", "Claude Monet"),
             ("The Last Supper", "Leonardo da Vinci"), ("The Persistence of Memory", "Salvador Dali"),
             ("American Gothic", "Grant Wood"), ("The Kiss", "Gustav Klimt"), ("Las Meninas", "Diego Velazquez"),
             ("The School of Athens", "Raphael"), ("Girl with a Pearl Earring", "Johannes Vermeer"),
             ("The Creation of Adam", "Michelangelo"), ("Sunflowers", "Vincent van Gogh")]
KINDS = {  # kind: (items, statement, question)
    "books": (BOOKS, "A new illustrated edition of {0} was published this spring.", "Question: Who wrote {0}?\nAnswer:"),
    "elements": (ELEMENTS, "A new method to refine {0} was announced last week.",
                 "Question: What is the chemical symbol of {0}?\nAnswer:"),
    "paintings": (PAINTINGS, "Last month {0} was moved to a new room of its museum.",
                  "Question: Who painted {0}?\nAnswer:"),
}


@torch.no_grad()
def hidden_all(model, tok, texts: list[str]) -> list[torch.Tensor]:
    """Per text, [n_layers + 1, n_tokens - 1, d] unit hidden states (first position dropped)."""
    out = []
    for t in texts:
        ids = torch.tensor([tok(t, add_special_tokens=False).input_ids[:128]])
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        out.append(F.normalize(torch.stack([h[0, 1:] for h in hs]).float(), dim=-1))
    return out


def scores(hid: list[torch.Tensor], layer: int, keys: torch.Tensor, contrast: torch.Tensor) -> np.ndarray:
    """Per text, its largest token margin (router.py)."""
    return np.array([float(((h[layer] @ keys.T).amax(1) - (h[layer] @ contrast.T).amax(1)).max()) for h in hid])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="calibration sample seeds")
    ap.add_argument("--layers", default="1,2,4,6,8", help="blocks to score")
    ap.add_argument("--stream-seeds", default="1000,1001,1002", help="validation seeds of the fictional stream")
    ap.add_argument("--calibration", type=int, default=C2WConfig().router_calibration, help="base samples")
    a = ap.parse_args()
    bb = load_backbone("smollm2")
    m, tok = bb.model, bb.tokenizer
    layers = [int(x) for x in a.layers.split(",")]
    # real-entity sets: first half of each kind written, second half asked about only
    written, on_q, off_q = [], [], []
    for items, stmt, q in KINDS.values():
        half = len(items) // 2
        written += [stmt.format(x[0]) for x in items[:half]]
        on_q += [q.format(x[0]) for x in items[:half]]
        off_q += [q.format(x[0]) for x in items[half:]]
    fic_written, fic_on = [], []
    for s in [int(x) for x in a.stream_seeds.split(",")]:
        st = generate_fictional(FictionalConfig(seed=s))
        fic_written.append([r.text for r in st.records if r.role == "learn"])
        fic_on.append([p.prompt for r in st.records if r.role == "learn" for p in r.probes])
    passages = general_text(16, seed=1)  # not the bench's drift passages (seed 0)
    H = {k: hidden_all(m, tok, v) for k, v in {"written": written, "on": on_q, "off": off_q, "text": passages}.items()}
    HF = [(hidden_all(m, tok, w), hidden_all(m, tok, o)) for w, o in zip(fic_written, fic_on)]
    print("| calib seed | layer | rule | threshold(s) | real on | real off | fictional on | text off |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in [int(x) for x in a.seeds.split(",")]:
        seqs = sample_rehearsal(m, tok, a.calibration, seed=seed, prompts=openers(True))
        cal = hidden_all(m, tok, [tok.decode(s) for s in seqs])
        for L in layers:
            # fold f: texts i with i % 3 == f are the held-out negatives, the rest the contrast set;
            # fold 2 of the old split (last third) is the rule in router.py ("one")
            n = 2 * len(cal) // 3
            folds = [(torch.cat([h[L] for h in cal[:n]]), cal[n:])]
            folds += [(torch.cat([h[L] for i, h in enumerate(cal) if i % 3 != f]), [h for i, h in enumerate(cal) if i % 3 == f])
                      for f in range(3)]

            def decide(hid, keys, rule):
                if rule == "one":
                    c, neg = folds[0]
                    return scores(hid, L, keys, c) > scores(neg, L, keys, c).max(), [scores(neg, L, keys, c).max()]
                rel, thr = [], []
                for c, neg in folds[1:]:
                    t = scores(neg, L, keys, c).max()
                    rel.append(scores(hid, L, keys, c) - t)
                    thr.append(t)
                rel = np.stack(rel)
                return (rel.mean(0) > 0) if rule == "fold-mean" else (rel.min(0) > 0), thr

            keys = torch.cat([h[L] for h in H["written"]])
            for rule in ("one", "fold-mean", "fold-all"):
                on, thr = decide(H["on"], keys, rule)
                off, _ = decide(H["off"], keys, rule)
                txt, _ = decide(H["text"], keys, rule)
                fon = [float(np.mean(decide(fo, torch.cat([h[L] for h in fw]), rule)[0])) for fw, fo in HF]
                print(f"| {seed} | {L} | {rule} | {' '.join(f'{t:.3f}' for t in thr)} | {on.mean():.2f} | {off.mean():.2f} "
                      f"| {np.mean(fon):.2f} | {txt.mean():.2f} |", flush=True)


if __name__ == "__main__":
    main()
