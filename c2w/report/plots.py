"""Figures for the report (matplotlib, headless).

Uses ``matplotlib.figure.Figure`` directly (Agg canvas, no pyplot, no global backend switch, never
``show``). Each plot is skipped cleanly -- no file, no exception -- when its data is missing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from c2w.report.aggregate import agg_array, agg_mean, agg_seed_arrays, agg_std, get_path
from c2w.report.markdown import method_label, ordered_methods

__all__ = [
    "plot_all",
    "plot_accuracy_matrix",
    "plot_retention",
    "plot_learning_vs_forgetting",
    "plot_cost_vs_accuracy",
    "plot_learning_speed",
    "since_learned_curve",
]

_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def _methods(results: dict) -> list[tuple[str, dict, str]]:
    methods = results.get("methods") if isinstance(results, dict) else None
    if not isinstance(methods, dict):
        return []
    out = []
    for i, name in enumerate(ordered_methods(results)):
        m = methods[name]
        if isinstance(m, dict):
            out.append((name, m, _COLORS[i % len(_COLORS)]))
    return out


def _new_fig(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _ok(x: float) -> bool:
    return x is not None and math.isfinite(x)


def _err(s: float) -> float | None:
    return s if _ok(s) and s > 0 else None


# --------------------------------------------------------------------------- accuracy matrix
def plot_accuracy_matrix(results: dict, path: Path) -> Path | None:
    """One annotated heatmap of mean ``R[i][j]`` per method (grid of subplots)."""
    items = []
    for name, m, _ in _methods(results):
        R = agg_array(get_path(m, "accuracy_matrix"))
        if R is not None and R.ndim == 2 and R.size and np.any(np.isfinite(R)):
            items.append((method_label(name, m), R))
    if not items:
        return None
    n = len(items)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    T = max(R.shape[0] for _, R in items)
    cell = 0.45 if T <= 8 else 0.3
    side = max(2.8, cell * T + 1.2)
    fig = _new_fig(side * ncols + 0.8, side * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    im = None
    for k, (label, R) in enumerate(items):
        ax = axes[k // ncols][k % ncols]
        im = ax.imshow(np.ma.masked_invalid(R), vmin=0.0, vmax=1.0, cmap="viridis", aspect="equal")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("episode j", fontsize=8)
        ax.set_ylabel("after episode i", fontsize=8)
        ax.tick_params(labelsize=7)
        rows, cols = R.shape
        if rows <= 30:
            ax.set_xticks(range(cols))
            ax.set_yticks(range(rows))
        if rows * cols <= 144:
            fs = 7 if rows <= 6 else 5
            for i in range(rows):
                for j in range(cols):
                    v = R[i, j]
                    if np.isfinite(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fs,
                                color="black" if v > 0.6 else "white")
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    return _save(fig, path)


# -------------------------------------------------------------------------------- retention
def since_learned_curve(R: np.ndarray) -> np.ndarray:
    """``c[d] = mean_j R[j+d][j]`` over ``j + d < T``: accuracy vs episodes since learned (nan-aware)."""
    R = np.asarray(R, dtype=float)
    T = min(R.shape)
    out = np.full(T, np.nan)
    for d in range(T):
        vals = np.array([R[j + d, j] for j in range(T - d)])
        vals = vals[np.isfinite(vals)]
        if vals.size:
            out[d] = vals.mean()
    return out


def plot_retention(results: dict, path: Path) -> Path | None:
    """Mean over episodes j of ``R[j+d][j]`` vs ``d`` (episodes since learned), std over seeds shaded."""
    fig = None
    ax = None
    drawn = 0
    for name, m, color in _methods(results):
        node = get_path(m, "accuracy_matrix")
        R = agg_array(node)
        if R is None or R.ndim != 2 or R.size == 0:
            continue
        seeds = [since_learned_curve(S) for S in agg_seed_arrays(node) if S.ndim == 2 and S.shape == R.shape]
        if len(seeds) >= 2:
            stack = np.stack(seeds)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-nan columns -> nan
                mean, std = np.nanmean(stack, 0), np.nanstd(stack, 0)
        else:
            mean, std = since_learned_curve(R), None
        if not np.any(np.isfinite(mean)):
            continue
        if fig is None:
            fig = _new_fig(6.0, 4.0)
            ax = fig.add_subplot(1, 1, 1)
        d = np.arange(mean.size)
        ax.plot(d, mean, marker="o", ms=3, color=color, label=method_label(name, m))
        if std is not None:
            ax.fill_between(d, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
        drawn += 1
    if not drawn:
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("episodes since learned (i − j)")
    ax.set_ylabel("accuracy R[i][j], mean over j")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


# ------------------------------------------------------------------------------ scatter plots
def _scatter(results: dict, path: Path, xkey: str, ykey: str, xlabel: str, ylabel: str,
             xscale: str | Callable[[np.ndarray], str] = "linear") -> Path | None:
    pts = []
    for name, m, color in _methods(results):
        x, y = agg_mean(get_path(m, xkey)), agg_mean(get_path(m, ykey))
        if _ok(x) and _ok(y):
            pts.append((method_label(name, m), x, y, agg_std(get_path(m, xkey)), agg_std(get_path(m, ykey)), color))
    if not pts:
        return None
    fig = _new_fig(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, x, y, sx, sy, color in pts:
        ax.errorbar([x], [y], xerr=_err(sx), yerr=_err(sy), fmt="o", color=color, capsize=3, ms=6)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    xs = np.array([p[1] for p in pts])
    scale = xscale(xs) if callable(xscale) else xscale
    if scale == "symlog":
        pos = xs[xs > 0]
        lin = 10.0 ** math.floor(math.log10(float(pos.min()))) if pos.size else 1.0
        ax.set_xscale("symlog", linthresh=lin)
    elif scale != "linear":
        ax.set_xscale(scale)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_learning_vs_forgetting(results: dict, path: Path) -> Path | None:
    """x = forgetting, y = learning accuracy, one point per method (mean ± std error bars)."""
    return _scatter(results, path, "forgetting", "learning_accuracy",
                    "forgetting (lower is better)", "learning accuracy (higher is better)")


def _log_or_symlog(xs: np.ndarray) -> str:
    if np.all(xs > 0):
        return "log"
    return "symlog" if np.any(xs > 0) else "linear"


def plot_cost_vs_accuracy(results: dict, path: Path) -> Path | None:
    """x = trained tokens (else FLOPs, else wall seconds), y = ACC; log x where values are > 0."""
    for key, label in (("cost.trained_tokens", "trained tokens"), ("cost.flops", "FLOPs"),
                       ("cost.wall_s", "wall time (s)")):
        xs = [agg_mean(get_path(m, key)) for _, m, _ in _methods(results)]
        if any(_ok(x) and x > 0 for x in xs):
            return _scatter(results, path, key, "acc", label, "ACC (final accuracy)", xscale=_log_or_symlog)
    return None


# --------------------------------------------------------------------------- learning speed
def plot_learning_speed(results: dict, path: Path) -> Path | None:
    """Current-episode accuracy vs write steps per method (std over seeds shaded)."""
    fig = None
    ax = None
    drawn = 0
    for name, m, color in _methods(results):
        s = agg_array(get_path(m, "learning_speed.steps"))
        a = agg_array(get_path(m, "learning_speed.acc"))
        if s is None or a is None or s.ndim != 1 or a.ndim != 1 or s.size == 0 or s.size != a.size:
            continue
        ok = np.isfinite(s) & np.isfinite(a)
        if not np.any(ok):
            continue
        sd = agg_array(get_path(m, "learning_speed.acc"), "std")
        if fig is None:
            fig = _new_fig(6.0, 4.0)
            ax = fig.add_subplot(1, 1, 1)
        auc = agg_mean(get_path(m, "learning_speed.auc"))
        label = method_label(name, m) + (f" (AUC {auc:.2f})" if _ok(auc) else "")
        ax.plot(s[ok], a[ok], marker="o", ms=3, color=color, label=label)
        if sd is not None and sd.shape == a.shape:
            ok2 = ok & np.isfinite(sd)
            ax.fill_between(s[ok2], (a - sd)[ok2], (a + sd)[ok2], color=color, alpha=0.15, linewidth=0)
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("write steps")
    ax.set_ylabel("accuracy on the current episode")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


# --------------------------------------------------------------------------------------- all
PLOTS: tuple[tuple[str, Callable[[dict, Path], Path | None]], ...] = (
    ("accuracy_matrix.png", plot_accuracy_matrix),
    ("retention.png", plot_retention),
    ("learning_vs_forgetting.png", plot_learning_vs_forgetting),
    ("cost_vs_accuracy.png", plot_cost_vs_accuracy),
    ("learning_speed.png", plot_learning_speed),
)


def plot_all(results: dict, out_dir: Path) -> list[Path]:
    """Write every plot whose data is present into ``out_dir``; returns the written paths.

    A plot whose data is missing is skipped (and a stale file of that name from an earlier run is
    removed, so the report never embeds an out-of-date figure).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, fn in PLOTS:
        path = out_dir / fname
        res = fn(results, path)
        if res is not None:
            written.append(res)
        elif path.exists():
            path.unlink()
    return written
