"""Merge the results.json of several `c2w bench` runs over the same streams into one report.

Runs are comparable only when they saw the same streams: the same stream source and generator
settings, the same reported seeds, the same budget, controls and probe format. Anything else is
refused with the differing keys named (comparing methods across different streams would be wrong).
"""

from __future__ import annotations

import json
from pathlib import Path

from c2w.config import GENERATOR_ONLY

# config keys that must agree for methods from different runs to share one table
SAME = ("stream", "model", "probe_format", "episodes", "facts_per_episode", "update_fraction", "stress",
        "controls", "general_texts", "token_budget", "progress_points", "seeds_reported", "stream_meta")


class MergeError(ValueError):
    pass


def load_results(path: str | Path) -> dict:
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"no results.json at {p}")
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{p} is not a bench run's results.json (give the run's folder or its results.json): {e}") from None
    if not isinstance(r, dict) or "methods" not in r:
        raise MergeError(f"{p} is not a bench run's results.json: it has no 'methods'")
    return r


def merge_results(runs: list[dict], names: list[str] | None = None) -> dict:
    """One results dict: the first run's config and provenance, every run's methods (a method
    present in several runs keeps its first occurrence), and the sources under config.merged_from."""
    if not runs:
        raise MergeError("nothing to merge")
    names = names or [f"run{k}" for k in range(len(runs))]
    first = runs[0].get("config", {})
    # the generator's settings say nothing about a stream file's stream (runs before session 22
    # recorded the preset's values there, later ones leave them unset)
    keys = SAME if first.get("stream", "fictional") == "fictional" else [k for k in SAME if k not in GENERATOR_ONLY]
    ref = next((r["config"]["stream_sha256"] for r in runs if r.get("config", {}).get("stream_sha256") is not None), None)
    for name, r in zip(names[1:], runs[1:]):
        fp = r.get("config", {}).get("stream_sha256")
        # the streams' content, against the first run that recorded it (runs before session 23 did not);
        # where both have it, it alone says whether the streams are the same: one file reached by two
        # paths is one stream
        known = None not in (fp, first.get("stream_sha256"))
        diff = [k for k in keys if r.get("config", {}).get(k) != first.get(k) and not (known and k == "stream")]
        if None not in (fp, ref) and fp != ref:
            diff.append("stream_sha256 (the streams' content)")
        if diff:
            raise MergeError(f"{name} did not run on the same streams as {names[0]}: differs in {', '.join(diff)}")
    methods: dict = {}
    lrs: dict = {}
    for r in runs:
        for m, v in r.get("methods", {}).items():
            methods.setdefault(m, v)
        for m, v in (r.get("config", {}).get("learning_rates") or {}).items():
            lrs.setdefault(m, v)
    config = {**first, "methods": list(methods), "learning_rates": lrs, "merged_from": names}
    return {"config": config, "provenance": runs[0].get("provenance", {}), "methods": methods}
