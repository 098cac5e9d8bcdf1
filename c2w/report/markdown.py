"""Render an aggregated ``results.json`` dict as a markdown report.

Every key may be missing, ``None`` or nan: such cells render as "–". Reference-group methods
(e.g. retrieval, which reads the stream at test time instead of writing weights) are listed last
and marked "(reference)".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from c2w.report.aggregate import agg_array, agg_mean, agg_n, agg_std, get_path
from c2w.report.targets import targets_markdown

__all__ = ["render_markdown", "ordered_methods", "method_label", "DEFAULT_IMAGES", "fmt_cell"]

DASH = "–"

DEFAULT_IMAGES: tuple[tuple[str, str], ...] = (
    ("accuracy_matrix.png", "Accuracy matrices R[i][j]"),
    ("retention.png", "Accuracy vs episodes since learned"),
    ("learning_vs_forgetting.png", "Learning accuracy vs forgetting"),
    ("cost_vs_accuracy.png", "Cost vs final accuracy"),
    ("learning_speed.png", "Learning speed"),
)


# ------------------------------------------------------------------------------------ methods
def ordered_methods(results: dict) -> list[str]:
    """Method names in insertion order, reference-group methods last."""
    methods = results.get("methods") or {}
    if not isinstance(methods, dict):
        return []
    names = list(methods)
    return [n for n in names if not _is_reference(methods[n])] + [n for n in names if _is_reference(methods[n])]


def _is_reference(m: Any) -> bool:
    return isinstance(m, dict) and m.get("group") == "reference"


def method_label(name: str, m: Any) -> str:
    return f"{name} (reference)" if _is_reference(m) else name


# --------------------------------------------------------------------------------- formatting
def _finite(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x)) and math.isfinite(x)


def f_acc(x: float) -> str:
    return f"{x:.3f}"


def f_signed(x: float) -> str:
    return f"{x:+.3f}"


def f_count(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def f_general(x: float) -> str:
    if abs(x - round(x)) < 1e-9 and abs(x) >= 1:
        return f"{x:.0f}"
    return f"{x:.3g}" if abs(x) >= 1 or x == 0 else f"{x:.3f}" if abs(x) >= 0.01 else f"{x:.2e}"


def f_sci(x: float) -> str:
    """1.2e12 style (no '+', no leading zeros in the exponent)."""
    if x == 0:
        return "0"
    mant, exp = f"{x:.1e}".split("e")
    return f"{mant}e{int(exp)}"


def f_si(x: float) -> str:
    """Counts in k / M / B (tokens, parameters)."""
    a = abs(x)
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{x / div:.3g}{suf}"
    return f_count(x)


def f_bytes(x: float) -> str:
    a = abs(x)
    for div, suf in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if a >= div:
            return f"{x / div:.3g} {suf}"
    return f"{x:.0f} B"


def f_mb(x: float) -> str:
    return f_bytes(x * (1 << 20))


def f_seconds(x: float) -> str:
    a = abs(x)
    if a >= 3600:
        return f"{x / 3600:.2g} h" if a < 36000 else f"{x / 3600:.0f} h"
    if a >= 60:
        return f"{x / 60:.3g} min"
    if a >= 1 or a == 0:
        return f"{x:.3g} s"
    return f"{x * 1000:.3g} ms"


def f_ratio(x: float) -> str:
    return f"{x:.3f}"


def f_small(x: float) -> str:
    return f"{x:.4g}"


def fmt_cell(node: Any, fmt: Callable[[float], str] = f_general) -> str:
    """``"mean ± std"`` of an aggregated leaf; "± std" is dropped with fewer than two seeds."""
    m = agg_mean(node)
    if not _finite(m):
        return DASH
    s = agg_std(node)
    n = agg_n(node)
    if _finite(s) and (n >= 2 or n == -1):
        if s == 0 and fmt not in (f_acc, f_signed, f_ratio):
            return f"{fmt(m)} ± 0"  # not "2 GiB ± 0 B"
        if fmt is f_signed:
            return f"{fmt(m)} ± {abs(s):.3f}"
        return f"{fmt(m)} ± {fmt(s)}"
    return fmt(m)


# --------------------------------------------------------------------------------- tables
# (column header, dotted path inside methods[NAME], formatter)
Column = tuple[str, str, Callable[[float], str]]

GROUPS: tuple[tuple[str, tuple[Column, ...]], ...] = (
    ("Continual learning", (
        ("ACC", "acc", f_acc),
        ("BWT", "bwt", f_signed),
        ("FWT", "fwt", f_signed),
        ("Forgetting", "forgetting", f_acc),
        ("Learning acc.", "learning_accuracy", f_acc),
        ("Retention", "retention", f_acc),
        ("Neg. flips", "flips.negative", f_count),
        ("Pos. flips", "flips.positive", f_count),
    )),
    ("Strict prefix / log-prob", (
        ("Strict ACC", "strict.acc", f_acc),
        ("Strict learning acc.", "strict.learning_accuracy", f_acc),
        ("Final mean log-prob", "logprob.final_mean", f_small),
    )),
    ("Updates", (
        ("New-answer acc.", "updates.new_answer_acc", f_acc),
        ("Stale persistence", "updates.stale_persistence", f_acc),
        ("# replaced facts", "updates.n", f_count),
    )),
    ("Locality", (
        ("Control acc.", "locality.control_acc", f_acc),
        ("Control rel.", "locality.control_rel", f_ratio),
        ("KL", "locality.kl", f_small),
        ("PPL ratio", "locality.ppl_ratio", f_ratio),
        ("KL, unrouted", "locality.kl_unrouted", f_small),
        ("Control acc., unrouted", "locality.control_acc_unrouted", f_acc),
        ("ACC, unrouted", "locality.acc_unrouted", f_acc),
        ("Routed: matrix", "locality.routed_matrix", f_acc),
        ("Routed: control", "locality.routed_control", f_acc),
        ("Routed: text", "locality.routed_text", f_acc),
    )),
    ("Learning speed", (
        ("AUC", "learning_speed.auc", f_acc),
    )),
    ("Gate", (
        ("Written: learn", "gate.written_learn", f_general),
        ("Written: noise", "gate.written_noise", f_general),
        ("Written: known", "gate.written_known", f_general),
        ("Known that the base answers", "gate.known_to_base", f_general),
        ("Written: known, base answers", "gate.written_known_to_base", f_general),
        ("Written: duplicate", "gate.written_duplicate", f_general),
    )),
    ("Cost", (
        ("Trained tokens", "cost.trained_tokens", f_si),
        ("FLOPs", "cost.flops", f_sci),
        ("FLOPs: write (no setup)", "cost.write_flops", f_sci),
        ("FLOPs: gate", "cost.flops_by.gate", f_sci),
        ("FLOPs: setup", "cost.flops_by.setup", f_sci),
        ("Wall", "cost.wall_s", f_seconds),
        ("Train", "cost.train_s", f_seconds),
        ("Peak mem", "cost.peak_mem_mb", f_mb),
        ("Trainable params", "cost.trainable_params", f_si),
        ("State / record", "cost.state_bytes_per_record", f_bytes),
        ("Probe latency ×", "cost.probe_latency_ratio", f_ratio),
    )),
)

HOW_TO_READ: tuple[tuple[str, str], ...] = (
    ("R[i][j]", "accuracy on episode j's probes after training through episode i (T×T; j > i is the future)."),
    ("ACC", "mean final accuracy over all episodes, `mean_j R[T-1][j]` (higher is better)."),
    ("BWT", "backward transfer, `mean_{j<T-1} (R[T-1][j] − R[j][j])`; negative means later writes erased earlier ones."),
    ("FWT", "forward transfer, `mean_{j>0} (R[j-1][j] − base[j])`; gain on an episode before it is seen, over the frozen base."),
    ("Forgetting", "`mean_{j<T-1} (max_{j≤i<T-1} R[i][j] − R[T-1][j])`; drop from peak to final (lower is better)."),
    ("Learning acc.", "`mean_j R[j][j]`, accuracy on an episode right after it was written (plasticity)."),
    ("Retention", "`mean_{j<T-1} R[T-1][j] / R[j][j]` over episodes with `R[j][j] > 0`; fraction of just-learned accuracy kept."),
    ("Flips", "per-probe correct→wrong (negative) and wrong→correct (positive) changes between consecutive evaluations after the fact was seen."),
    ("Strict", "the same accuracies under strict (exact-prefix) answer matching; log-prob is the mean answer log-probability at the end."),
    ("Updates", "for facts that replace an older fact: new-answer accuracy at the end, and how often the stale answer still appears."),
    ("Locality", "accuracy on never-shown control facts (absolute and relative to base), KL to the base model and perplexity ratio on unrelated text; tests collateral damage. With the router (on in `c2w` since session 12; off in `c2w-no-router`), each input goes through the adapters or the frozen base: `Routed` is the share of each kind sent through the adapters, the `unrouted` columns the same weights at the end with the adapters always on."),
    ("Learning speed", "normalised area under current-episode accuracy vs the share of the episode's tokens trained, c2w's sleep included (1.0 = perfect from the first step)."),
    ("Gate", "how many records of each role the write gate chose to write (ideally: learn yes; noise, known, duplicate no)."),
    ("Cost", "trained tokens, estimated FLOPs (`write`: all but the one-time setup, i.e. the router's calibration; `gate`: the gate's own passes), wall/train time, peak memory, trainable parameters, persistent state per record, probe latency relative to the base model."),
)


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align_first_left: bool = True) -> str:
    sep = [":---" if (i == 0 and align_first_left) else "---:" for i in range(len(header))]
    return "\n".join([_row(header), "| " + " | ".join(sep) + " |", *(_row(r) for r in rows)])


def _group_table(results: dict, columns: Sequence[Column]) -> str:
    methods = results.get("methods") or {}
    rows = []
    for name in ordered_methods(results):
        m = methods.get(name)
        rows.append([method_label(name, m)] + [fmt_cell(get_path(m, path), fmt) for _, path, fmt in columns])
    return _table(["Method", *(h for h, _, _ in columns)], rows)


def _matrix_table(m: dict) -> str | None:
    R = agg_array(get_path(m, "accuracy_matrix"))
    if R is None or R.ndim != 2 or R.size == 0:
        return None
    S = agg_array(get_path(m, "accuracy_matrix"), "std")
    if S is not None and S.shape != R.shape:
        S = None
    T_rows, T_cols = R.shape
    header = ["after ep. \\ ep.", *(str(j) for j in range(T_cols))]

    def cell(i: int, j: int) -> str:
        v = R[i, j]
        if not _finite(v):
            return DASH
        txt = f"{v:.3f}"
        if S is not None and _finite(S[i, j]) and S[i, j] > 0:
            txt += f" ± {S[i, j]:.3f}"
        return f"**{txt}**" if i == j else txt

    rows = [[str(i), *(cell(i, j) for j in range(T_cols))] for i in range(T_rows)]
    b = agg_array(get_path(m, "base_accuracy"))
    if b is not None and b.ndim == 1:
        rows.append(["base", *((f"{b[j]:.3f}" if j < b.size and _finite(b[j]) else DASH) for j in range(T_cols))])
    return _table(header, rows)


# ---------------------------------------------------------------------------------- config
_CONFIG_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Stream", ("stream", "stream_name", "stream_path", "dataset")),
    ("Model", ("model", "model_name", "backbone")),
    ("Seeds", ("seeds", "seed", "n_seeds")),
    ("Preset", ("preset", "budget", "profile")),
    ("Probe format", ("probe_format", "probe_form", "probe", "probes", "prompt_format")),
    ("Device", ("device", "accelerator")),
)


def _find(d: Any, names: Sequence[str], depth: int = 1) -> Any:
    if not isinstance(d, dict):
        return None
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    if depth > 0:
        for v in d.values():
            if isinstance(v, dict):
                hit = _find(v, names, depth - 1)
                if hit is not None:
                    return hit
    return None


def _short(v: Any, limit: int = 120) -> str:
    if isinstance(v, dict):
        for k in ("name", "path", "id"):
            if isinstance(v.get(k), (str, int, float)):
                return str(v[k])
        txt = json.dumps(v, default=str, sort_keys=True)
    elif isinstance(v, (list, tuple)):
        txt = ", ".join(str(x) for x in v) if all(isinstance(x, (str, int, float)) for x in v) else json.dumps(v, default=str)
    else:
        txt = str(v)
    return txt if len(txt) <= limit else txt[: limit - 1] + "…"


def _config_section(results: dict) -> list[str]:
    config = results.get("config") if isinstance(results.get("config"), dict) else {}
    prov = results.get("provenance") if isinstance(results.get("provenance"), dict) else {}
    lines = ["## Setup", ""]
    for label, names in _CONFIG_KEYS:
        v = _find(config, names)
        if v is None:
            v = _find(prov, names)
        lines.append(f"- **{label}:** {DASH if v is None else '`' + _short(v) + '`'}")
    scal = {k: v for k, v in prov.items() if isinstance(v, (str, int, float, bool)) and v is not None}
    if scal:
        lines.append("- **Provenance:** " + "; ".join(f"{k} = `{_short(v, 60)}`" for k, v in scal.items()))
    methods = results.get("methods") or {}
    if isinstance(methods, dict) and methods:
        lines.append("- **Methods:** " + ", ".join(
            f"{n} ({get_path(methods[n], 'group') or '?'})" for n in ordered_methods(results)))
    lrs = config.get("learning_rates")
    if isinstance(lrs, dict) and lrs:
        how = "this run's grid on the validation seed" if config.get("lr_search") else "preset defaults"
        lines.append("- **Learning rates:** " + ", ".join(f"{m} {v:g}" for m, v in lrs.items() if v) + f" ({how})")
    if config or prov:
        lines += ["", "<details><summary>Full config and provenance</summary>", "", "```json",
                  json.dumps({"config": config, "provenance": prov}, indent=2, default=str, sort_keys=True),
                  "```", "", "</details>"]
    return lines + [""]


# ---------------------------------------------------------------------------------- render
def render_markdown(results: dict, images: Sequence[str | Path] | None = None,
                    title: str = "Context-to-Weight Consolidation: results") -> str:
    """The whole report as markdown.

    Args:
        results: aggregated results (``{"config", "provenance", "methods"}``); anything may be missing.
        images: PNG file names (relative to the report) to embed; ``None`` embeds the default set
            (``DEFAULT_IMAGES``) whether or not the files exist.
        title: top heading.
    """
    results = results if isinstance(results, dict) else {}
    methods = results.get("methods") if isinstance(results.get("methods"), dict) else {}
    out: list[str] = [f"# {title}", ""]
    out += _config_section(results)
    if not methods:
        out += ["_No methods in results._", ""]

    out += targets_markdown(methods)
    for gname, columns in GROUPS:
        out += [f"## {gname}", "", _group_table(results, columns), ""]
        if gname == "Continual learning":
            out += ["Cells are mean ± std over seeds (population std); \"–\" = not measured / undefined.", ""]

    # accuracy matrices
    mats = [(n, _matrix_table(methods[n])) for n in ordered_methods(results)]
    mats = [(n, t) for n, t in mats if t]
    if mats:
        out += ["## Accuracy matrices", "",
                "Row i = after training through episode i, column j = episode j's probes; "
                "**bold** = diagonal (just learned); last row = frozen base model.", ""]
        for n, t in mats:
            out += [f"### {method_label(n, methods[n])}", "", t, ""]

    # figures
    if images is None:
        figs = list(DEFAULT_IMAGES)
    else:
        captions = dict(DEFAULT_IMAGES)
        figs = [(Path(p).name, captions.get(Path(p).name, Path(p).stem.replace("_", " "))) for p in images]
    if figs:
        out += ["## Figures", ""]
        for fname, cap in figs:
            out += [f"![{cap}]({fname})", ""]

    out += ["## How to read this", ""]
    out += [f"- **{k}**: {v}" for k, v in HOW_TO_READ]
    out.append("")
    return "\n".join(out)
