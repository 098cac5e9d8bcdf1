"""Continual-learning metrics: pure numpy, no model code.

Notation (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"; Chaudhry et al. 2018, "Riemannian
Walk"): a stream has ``T`` episodes. ``R[i][j]`` is the accuracy on episode ``j``'s probes after
training through episode ``i`` (a full ``T x T`` matrix, so it includes the future ``j > i``).
``b[j]`` is the frozen base model's accuracy on episode ``j``'s probes.

=====================  =================================================================
ACC                    ``1/T * sum_j R[T-1][j]``
BWT                    ``1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j])``
FWT                    ``1/(T-1) * sum_{j>0} (R[j-1][j] - b[j])``
forgetting             ``1/(T-1) * sum_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])``
learning accuracy      ``1/T * sum_j R[j][j]``
retention              ``mean_{j<T-1, R[j][j]>0} R[T-1][j] / R[j][j]``
=====================  =================================================================

With ``T == 1`` there is no past and no future episode: BWT, FWT, forgetting and retention are
``nan``; ACC and learning accuracy are defined. An episode whose column is all ``nan`` has nothing
to score (no probes, or every one replaced by a later record): each average runs over the other
episodes (``1/T`` becomes one over the episodes that have probes). Any other ``nan`` cell
propagates (no silent skipping).

Aggregation over seeds (`mean_std`, `aggregate_matrix`) is nan-aware: ``nan``/``None`` entries are
ignored in the mean and std (and are ``None`` in ``per_seed`` so the result is valid JSON).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "acc",
    "bwt",
    "fwt",
    "forgetting",
    "learning_accuracy",
    "retention",
    "cl_metrics",
    "flip_counts",
    "learning_curve_auc",
    "update_metrics",
    "mean_std",
    "aggregate_matrix",
]


# --------------------------------------------------------------------------------------- checks
def _as_matrix(R: Any) -> np.ndarray:
    try:
        arr = np.asarray(_none_to_nan(R), dtype=float)
    except (TypeError, ValueError) as e:  # ragged nested lists, strings...
        raise ValueError(f"accuracy matrix is not a numeric square matrix: {e}") from None
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"accuracy matrix R must be square (T x T), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError("accuracy matrix R is empty (T == 0)")
    return arr


def _as_base(base: Any, T: int) -> np.ndarray:
    try:
        b = np.asarray(_none_to_nan(base), dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"base accuracy is not a numeric vector: {e}") from None
    if b.ndim != 1 or b.shape[0] != T:
        raise ValueError(f"base accuracy must be a vector of length T={T}, got shape {b.shape}")
    return b


def _none_to_nan(x: Any) -> Any:
    """Recursively replace ``None`` by ``nan`` in (nested) lists; arrays pass through."""
    if x is None:
        return math.nan
    if isinstance(x, (list, tuple)):
        return [_none_to_nan(v) for v in x]
    return x


# ------------------------------------------------------------------------------ matrix metrics
def _probed(R: np.ndarray) -> np.ndarray:
    """Indices of the episodes with something to score (a column not all nan)."""
    return np.flatnonzero(~np.all(np.isnan(R), axis=0))


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan


def acc(R: Any) -> float:
    """Average final accuracy: ``ACC = 1/T * sum_j R[T-1][j]``."""
    R = _as_matrix(R)
    return _mean(R[-1, _probed(R)])


def bwt(R: Any) -> float:
    """Backward transfer: ``BWT = 1/(T-1) * sum_{j<T-1} (R[T-1][j] - R[j][j])``; nan when T == 1.

    Negative BWT is forgetting of what was learned when it was seen.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    if T < 2:
        return math.nan
    j = _probed(R)
    j = j[j < T - 1]
    return _mean(R[T - 1, j] - R[j, j])


def fwt(R: Any, base: Any) -> float:
    """Forward transfer: ``FWT = 1/(T-1) * sum_{j>0} (R[j-1][j] - b[j])``; nan when T == 1.

    How much training on episodes ``< j`` helps episode ``j`` before it is seen, relative to the
    frozen base model.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    b = _as_base(base, T)
    if T < 2:
        return math.nan
    j = _probed(R)
    j = j[j > 0]
    return _mean(R[j - 1, j] - b[j])


def forgetting(R: Any) -> float:
    """Average forgetting (Chaudhry et al. 2018); nan when T == 1.

    ``F = 1/(T-1) * sum_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j])`` -- the drop from the best
    accuracy an episode ever had (from the moment it was trained on) to its final accuracy.
    """
    R = _as_matrix(R)
    T = R.shape[0]
    if T < 2:
        return math.nan
    drops = [np.max(R[j:T - 1, j]) - R[T - 1, j] for j in _probed(R) if j < T - 1]
    return _mean(np.asarray(drops, dtype=float))


def learning_accuracy(R: Any) -> float:
    """Learning accuracy (just-learned accuracy): ``LA = 1/T * sum_j R[j][j]``."""
    R = _as_matrix(R)
    j = _probed(R)
    return _mean(R[j, j])


def retention(R: Any) -> float:
    """Mean retained fraction: ``mean_{j<T-1, R[j][j]>0} R[T-1][j] / R[j][j]``.

    nan when T == 1 or when no earlier episode was ever learned (all ``R[j][j] <= 0``).
    """
    R = _as_matrix(R)
    T = R.shape[0]
    if T < 2:
        return math.nan
    j = np.arange(T - 1)
    diag = R[j, j]
    ok = diag > 0  # nan compares False -> skipped
    if not np.any(ok):
        return math.nan
    return float(np.mean(R[T - 1, j[ok]] / diag[ok]))


def cl_metrics(R: Any, base: Any) -> dict[str, float]:
    """All matrix metrics at once.

    Args:
        R: ``T x T`` accuracy matrix, ``R[i][j]`` = accuracy on episode j after training through i.
        base: length-``T`` frozen-base accuracy per episode.

    Returns:
        ``{"acc", "bwt", "fwt", "forgetting", "learning_accuracy", "retention"}`` as floats
        (nan where undefined, see module docstring).

    Raises:
        ValueError: R not square / empty, or base not of length T.
    """
    Rm = _as_matrix(R)
    b = _as_base(base, Rm.shape[0])
    return {
        "acc": acc(Rm),
        "bwt": bwt(Rm),
        "fwt": fwt(Rm, b),
        "forgetting": forgetting(Rm),
        "learning_accuracy": learning_accuracy(Rm),
        "retention": retention(Rm),
    }


# ------------------------------------------------------------------------------- item metrics
def flip_counts(correct: np.ndarray, learned_at: np.ndarray) -> dict[str, float]:
    """Per-item correctness flips after an item's fact was observed.

    ``correct`` is ``(T, n_items)`` bool: item k correct after episode i. ``learned_at[k]`` is the
    episode at which item k's fact was observed. Over consecutive evaluations ``i -> i+1`` with
    ``i >= learned_at[k]``:

    - negative flips: ``correct[i,k] and not correct[i+1,k]`` (True -> False)
    - positive flips: ``not correct[i,k] and correct[i+1,k]`` (False -> True)
    - ``negative_rate = negative / max(1, number of such transitions)``

    Returns ``{"negative": int, "positive": int, "negative_rate": float, "transitions": int}``.
    """
    c = np.asarray(correct, dtype=bool)
    if c.ndim == 1:
        c = c[:, None]
    if c.ndim != 2:
        raise ValueError(f"correct must be (T, n_items), got shape {c.shape}")
    T, n = c.shape
    la = np.asarray(learned_at).reshape(-1)
    if la.shape[0] != n:
        raise ValueError(f"learned_at must have length n_items={n}, got {la.shape[0]}")
    if T < 2 or n == 0:
        return {"negative": 0, "positive": 0, "negative_rate": 0.0, "transitions": 0}
    i = np.arange(T - 1)[:, None]  # (T-1, 1)
    mask = i >= la.astype(int)[None, :]  # (T-1, n)
    before, after = c[:-1], c[1:]
    neg = int(np.sum(before & ~after & mask))
    pos = int(np.sum(~before & after & mask))
    possible = int(np.sum(mask))
    return {"negative": neg, "positive": pos, "negative_rate": neg / max(1, possible),
            "transitions": possible}


def learning_curve_auc(steps: Sequence[float], acc: Sequence[float]) -> float:
    """Normalised area under an accuracy-vs-write-steps curve.

    ``AUC = integral_0^1 acc(x) dx`` with ``x = (s - s_0) / (s_last - s_0)`` (trapezoid rule), so a
    curve constant at ``a`` gives ``a``. A single point (or all steps equal) returns the mean
    accuracy; an empty curve returns nan.

    Raises:
        ValueError: lengths differ or steps decrease.
    """
    s = np.asarray(steps, dtype=float).reshape(-1)
    a = np.asarray(acc, dtype=float).reshape(-1)
    if s.shape != a.shape:
        raise ValueError(f"steps and acc must have the same length, got {s.shape[0]} and {a.shape[0]}")
    if s.size == 0:
        return math.nan
    if np.any(np.diff(s) < 0):
        raise ValueError("steps must be non-decreasing")
    span = s[-1] - s[0]
    if s.size == 1 or span <= 0:
        return float(np.mean(a))
    x = (s - s[0]) / span
    return float(np.sum((x[1:] - x[:-1]) * (a[1:] + a[:-1]) / 2.0))


def update_metrics(new_correct: np.ndarray, stale_present: np.ndarray) -> dict[str, float]:
    """Knowledge-update metrics over replaced facts.

    ``new_correct[k]``: the fraction (or 0/1) of update k's new probes answered correctly at the end
    of the stream. ``stale_present[k]``: the fraction of its retired (old-answer) probes whose old
    answer still comes out at the end. Fractions stay fractions: an update with a cloze and a
    question probe, one of them right, counts 0.5, not 1.

    Returns ``{"new_answer_acc": mean(new_correct), "stale_persistence": mean(stale_present),
    "n": k}`` (means are nan when there are no replaced facts).
    """
    nc = np.asarray(new_correct, dtype=float).reshape(-1)
    sp = np.asarray(stale_present, dtype=float).reshape(-1)
    if nc.shape != sp.shape:
        raise ValueError(f"new_correct and stale_present differ in length: {nc.shape[0]} vs {sp.shape[0]}")
    if np.any((nc < 0) | (nc > 1)) or np.any((sp < 0) | (sp > 1)):
        raise ValueError("new_correct and stale_present are fractions in [0, 1]")
    n = int(nc.shape[0])
    if n == 0:
        return {"new_answer_acc": math.nan, "stale_persistence": math.nan, "n": 0}
    return {"new_answer_acc": float(np.mean(nc)), "stale_persistence": float(np.mean(sp)), "n": n}


# --------------------------------------------------------------------------------- over seeds
def _nan_to_none(x: Any) -> Any:
    """Nested lists with nan -> None (JSON-safe)."""
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if x is None:
        return None
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return x
    return None if math.isnan(xf) else xf


def _nanmean_std(arr: np.ndarray, axis: int | None = None) -> tuple[Any, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-nan slices -> nan, quietly
        return np.nanmean(arr, axis=axis), np.nanstd(arr, axis=axis, ddof=0)


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and population std (``ddof=0``) over seeds, nan-aware.

    ``nan``/``None`` entries are ignored (std of one finite value is 0); if no value is finite,
    mean and std are nan. Returns ``{"mean": float, "std": float, "per_seed": list}`` with nan
    written as ``None`` in ``per_seed``.
    """
    arr = np.asarray([math.nan if v is None else float(v) for v in values], dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        m, s = math.nan, math.nan
    else:
        m, s = (float(v) for v in _nanmean_std(arr))
    return {"mean": m, "std": s, "per_seed": [_nan_to_none(float(v)) for v in arr]}


def aggregate_matrix(mats: Sequence[Any]) -> dict[str, Any]:
    """Elementwise `mean_std` over seeds for same-shape arrays (vectors, matrices...).

    Returns ``{"mean": nested list, "std": nested list, "per_seed": [nested list, ...]}``; cells
    with no finite value over seeds are nan in mean/std; nan cells are ``None`` in ``per_seed``.

    Raises:
        ValueError: shapes differ across seeds.
    """
    arrs = []
    for m in mats:
        try:
            arrs.append(np.asarray(_none_to_nan(m), dtype=float))
        except (TypeError, ValueError) as e:
            raise ValueError(f"aggregate_matrix: not a numeric array: {e}") from None
    if not arrs:
        return {"mean": [], "std": [], "per_seed": []}
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"aggregate_matrix: shapes differ across seeds: {sorted(shapes)}")
    stack = np.stack(arrs)
    m, s = _nanmean_std(stack, axis=0)
    return {"mean": np.asarray(m).tolist(), "std": np.asarray(s).tolist(),
            "per_seed": [_nan_to_none(a.tolist()) for a in arrs]}
