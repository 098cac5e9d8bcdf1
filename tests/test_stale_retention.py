"""scripts/stale_retention.py: each update's stale rate beside the same episode's other facts kept."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from stale_retention import per_seed  # noqa: E402

from c2w.bench import BenchConfig, build_stream  # noqa: E402


def test_ratio_uses_the_replaced_facts_episodes():
    cfg = dict(stream="fictional", episodes=3, facts_per_episode=4, update_fraction=0.5, stress=0, seeds_reported=[0])
    stream = build_stream(BenchConfig(**{k: v for k, v in cfg.items() if k != "seeds_reported"}), 0)
    replaced = {r.replaces for r in stream.records if r.replaces}
    olds = [r.replaces for r in stream.records if r.replaces and r.id not in replaced]
    episode = {r.id: r.episode for r in stream.records}
    assert olds, "the stream should have updates"
    last = [0.8, 0.4, 0.2]  # final accuracy on episodes 0, 1, 2
    results = {"config": cfg, "methods": {"m": {
        "updates": {"stale_persistence": {"per_seed": [0.1]}},
        "accuracy_matrix": {"per_seed": [[[0, 0, 0], [0, 0, 0], last]]}}}}
    (stale, kept, n), = per_seed(results)["m"]
    assert stale == 0.1 and n == len(olds)
    assert abs(kept - sum(last[episode[o]] for o in olds) / len(olds)) < 1e-12
