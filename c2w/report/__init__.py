"""Reporting: aggregate per-seed runs, draw figures, write ``report.md``.

    from c2w.report import write_report
    write_report(results, Path("runs/x"))   # -> runs/x/report.md (+ PNGs next to it)
"""

from __future__ import annotations

from pathlib import Path

from c2w.report.aggregate import aggregate_runs, jsonable
from c2w.report.markdown import render_markdown
from c2w.report.plots import plot_all

__all__ = ["write_report", "aggregate_runs", "jsonable", "render_markdown", "plot_all"]


def write_report(results: dict, out_dir: Path) -> Path:
    """Write the figures and ``report.md`` for aggregated ``results`` into ``out_dir``.

    Figures whose data is missing are skipped and not embedded. Returns the path of report.md.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plot_all(results, out_dir)
    path = out_dir / "report.md"
    path.write_text(render_markdown(results, images=[p.name for p in images]), encoding="utf-8")
    return path
