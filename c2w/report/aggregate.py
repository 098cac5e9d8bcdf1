"""Aggregate per-seed run dicts of one method into ``{"mean", "std", "per_seed"}`` leaves.

Input: a list of per-seed run dicts (nested dicts of numbers, lists of numbers, strings). Output:
the same tree where

- every numeric leaf (int / float / bool / None / nan) -> `mean_std` over seeds,
- every (nested) list of numbers -> `aggregate_matrix` (elementwise); ragged lists across seeds
  (e.g. learning curves of different length) are nan-padded to the largest shape first,
- strings / other values -> kept when equal across seeds, else ``{"per_seed": [...]}``,
- keys missing in some seeds count as ``None`` for those seeds.

This is what ``results.json``'s ``methods[NAME]`` holds.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from c2w.evaluation.metrics import aggregate_matrix, mean_std

__all__ = ["aggregate_runs", "jsonable", "is_agg", "get_path", "agg_mean", "agg_std", "agg_array", "agg_seed_arrays", "agg_n"]

def is_agg(node: Any) -> bool:
    """True for an aggregated leaf ``{"mean", "std", "per_seed"}``."""
    return isinstance(node, dict) and "mean" in node and "per_seed" in node


def _is_num(x: Any) -> bool:
    return x is None or (isinstance(x, (numbers.Number, np.number, np.bool_)) and not isinstance(x, complex))


def _is_numeric_tree(x: Any) -> bool:
    """A (nested) list / array whose leaves are all numbers or None."""
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "biuf"
    if isinstance(x, (list, tuple)):
        return all(_is_num(v) or _is_numeric_tree(v) for v in x)
    return False


def _shape(x: Any) -> tuple[int, ...] | None:
    """Shape of a nested list, or None if ragged / mixed depth."""
    if isinstance(x, np.ndarray):
        return tuple(x.shape)
    if not isinstance(x, (list, tuple)):
        return ()
    if len(x) == 0:
        return (0,)
    subs = {_shape(v) for v in x}
    if len(subs) != 1 or None in subs:
        return None
    (sub,) = subs
    return (len(x), *sub)


def _pad(x: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Nested list -> float array of ``shape``, nan-padded (None -> nan)."""
    out = np.full(shape, math.nan)
    arr = np.asarray(_to_float(x), dtype=float)
    out[tuple(slice(0, n) for n in arr.shape)] = arr
    return out


def _to_float(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.astype(float)
    if isinstance(x, (list, tuple)):
        return [_to_float(v) for v in x]
    return math.nan if x is None else float(x)


def _agg_lists(vals: list[Any]) -> dict[str, Any]:
    present = [v for v in vals if v is not None]
    shapes = [_shape(v) for v in present]
    if any(s is None for s in shapes):  # ragged inside one seed: nothing sensible to average
        return {"mean": None, "std": None, "per_seed": [jsonable(v) for v in vals]}
    if not shapes:
        return {"mean": None, "std": None, "per_seed": [None for _ in vals]}
    ndims = {len(s) for s in shapes}
    if len(ndims) != 1:
        return {"mean": None, "std": None, "per_seed": [jsonable(v) for v in vals]}
    full = tuple(max(s[d] for s in shapes) for d in range(ndims.pop()))
    mats = [np.full(full, math.nan) if v is None else _pad(v, full) for v in vals]
    return aggregate_matrix(mats)


def jsonable(x: Any) -> Any:
    """Strict-JSON form of a results tree: arrays to lists, numpy scalars to Python, NaN and
    infinities to null, keys to strings (what results.json holds)."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (numbers.Number, np.number)):
        f = float(x)
        return None if not math.isfinite(f) else (int(x) if isinstance(x, (int, np.integer)) else f)
    return x


def _safe_eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # e.g. arrays with ambiguous truth value
        return False


def _aggregate(vals: list[Any]) -> Any:
    non_none = [v for v in vals if v is not None]
    if not non_none:
        return mean_std([None] * len(vals))
    if all(isinstance(v, dict) for v in non_none):
        keys: list[str] = []
        for v in non_none:
            keys.extend(k for k in v if k not in keys)
        return {k: _aggregate([v.get(k) if isinstance(v, dict) else None for v in vals]) for k in keys}
    if all(_is_num(v) for v in non_none):
        return mean_std([None if v is None else float(v) for v in vals])
    if all(_is_numeric_tree(v) for v in non_none):
        return _agg_lists(vals)
    first = non_none[0]
    if all(_safe_eq(v, first) for v in non_none):  # equal where present (missing seeds ignored)
        return jsonable(first)
    return {"per_seed": [jsonable(v) for v in vals]}


def aggregate_runs(runs: list[dict]) -> dict:
    """Aggregate one method's per-seed run dicts (see module docstring).

    >>> out = aggregate_runs([{"acc": 0.2, "group": "c2w"}, {"acc": 0.4, "group": "c2w"}])
    >>> round(out["acc"]["mean"], 6), round(out["acc"]["std"], 6), out["group"]
    (0.3, 0.1, 'c2w')
    """
    if not runs:
        return {}
    if not all(isinstance(r, dict) for r in runs):
        raise TypeError("aggregate_runs expects a list of dicts (one per seed)")
    out = _aggregate(list(runs))
    assert isinstance(out, dict)
    return out


# ------------------------------------------------------- readers for aggregated results (report)
def get_path(node: Any, path: str, default: Any = None) -> Any:
    """``get_path(m, "cost.wall_s")``: walk dotted keys, ``default`` on any missing step."""
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def _f(x: Any) -> float:
    if x is None or isinstance(x, (str, bytes, dict, list, tuple)):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def agg_mean(node: Any) -> float:
    """Mean of an aggregated scalar leaf (or a bare number); nan when missing / not numeric."""
    return _f(node.get("mean")) if isinstance(node, dict) else _f(node)


def agg_std(node: Any) -> float:
    """Std of an aggregated scalar leaf; nan when missing (0 for a bare number is not assumed)."""
    return _f(node.get("std")) if isinstance(node, dict) else math.nan


def agg_n(node: Any) -> int:
    """Number of seeds with a finite value in an aggregated scalar leaf (-1 if unknown)."""
    if isinstance(node, dict) and isinstance(node.get("per_seed"), list):
        return sum(1 for v in node["per_seed"] if not math.isnan(_f(v)))
    return -1


def agg_array(node: Any, key: str = "mean") -> np.ndarray | None:
    """``node[key]`` of an aggregated array leaf (or a bare nested list) as a float array.

    None -> nan; returns None when missing, ragged or not numeric.
    """
    val = node.get(key) if isinstance(node, dict) else (node if key == "mean" else None)
    if val is None or not _is_numeric_tree(val):
        return None
    if _shape(val) is None:
        return None
    try:
        return np.asarray(_to_float(val), dtype=float)
    except (TypeError, ValueError):
        return None


def agg_seed_arrays(node: Any) -> list[np.ndarray]:
    """The per-seed arrays of an aggregated array leaf (those that are well-formed)."""
    if not isinstance(node, dict) or not isinstance(node.get("per_seed"), list):
        return []
    out = []
    for v in node["per_seed"]:
        if v is not None and _is_numeric_tree(v) and _shape(v) is not None:
            out.append(np.asarray(_to_float(v), dtype=float))
    return out
