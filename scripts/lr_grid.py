"""Choose learning rates on the validation seed only (never a reported seed).

Runs `c2w.bench.choose_lrs` (final ACC on the validation seed's stream, every method at the same
budget) and writes the choices as JSON, so that `DEFAULT_LR` in c2w/bench.py can cite a measured grid:

    .venv/bin/python scripts/lr_grid.py --methods lora full-ft c2w --out runs/lr-grid.json
"""

from __future__ import annotations

import argparse
import json
import time

from c2w.bench import LR_GRID, BenchConfig, choose_lrs, prepare
from c2w.config import FIRST_VALIDATION_SEED


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(LR_GRID), help="methods to grid (keys of LR_GRID)")
    ap.add_argument("--preset", default="quick", help="bench preset whose stream size and budget are used")
    ap.add_argument("--out", default="runs/lr-grid.json", help="where the choices are written")
    ap.add_argument("--episodes", type=int, help="override the preset's episodes (to try a protocol)")
    ap.add_argument("--facts-per-episode", type=int, help="override the preset's facts per episode")
    ap.add_argument("--token-budget", type=int, help="override the preset's trained tokens per episode")
    ap.add_argument("--validation-seed", type=int, default=FIRST_VALIDATION_SEED,
                    help=f"the stream's seed (>= {FIRST_VALIDATION_SEED}: never a reported one)")
    a = ap.parse_args()
    if a.validation_seed < FIRST_VALIDATION_SEED:
        ap.error(f"--validation-seed must be >= {FIRST_VALIDATION_SEED}; seeds below are the reported ones")
    cfg = BenchConfig(methods=a.methods, preset=a.preset, episodes=a.episodes, facts_per_episode=a.facts_per_episode,
                      token_budget=a.token_budget, validation_seed=a.validation_seed).resolved()
    t0 = time.perf_counter()
    bb, controls, passages, base_lp = prepare(cfg)
    choice = choose_lrs(bb, cfg, controls, passages, base_lp)
    res = {"preset": a.preset, "episodes": cfg.episodes, "facts_per_episode": cfg.facts_per_episode,
           "token_budget": cfg.token_budget, "validation_seed": cfg.validation_seed, "grid": {m: LR_GRID[m] for m in choice},
           "choice": choice, "wall_s": time.perf_counter() - t0}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
