"""The c2w issue's targets, checked against `lora` (and `c2w-no-gate` on gate-stress streams).

Each row: the measured value for c2w, the reference's, the ratio or difference the target is
about, the target, and whether this run meets it. Means over seeds; a missing method or metric
gives no row (nothing is inferred).
"""

from __future__ import annotations

import math
from typing import Any


def _mean(m: dict, *path: str) -> float:
    node: Any = m
    for p in path:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node = node.get("mean")
    return float(node) if isinstance(node, (int, float)) and math.isfinite(node) else float("nan")


def _num(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.3g}" if abs(x) >= 1000 else f"{x:.3f}"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def target_rows(methods: dict, ours: str = "c2w") -> list[tuple[str, str, str, str, str, str]]:
    """(target, c2w, reference, measured, wanted, met) rows; strings, ready for a table."""
    c = methods.get(ours)
    if not isinstance(c, dict):
        return []
    rows = []

    def add(name, a, b, measured, wanted, ok):
        if math.isfinite(measured):
            rows.append((name, _num(a), _num(b), f"{measured:.3f}", wanted, "yes" if ok else "**no**"))

    lora = methods.get("lora")
    if isinstance(lora, dict):
        f, fl = _mean(c, "forgetting"), _mean(lora, "forgetting")
        add("forgetting vs lora", f, fl, _ratio(f, fl), "<= 0.5x", _ratio(f, fl) <= 0.5)
        b, bl = -_mean(c, "bwt"), -_mean(lora, "bwt")
        add("-BWT vs lora", b, bl, _ratio(b, bl), "<= 0.5x", _ratio(b, bl) <= 0.5)
        la, ll = _mean(c, "learning_accuracy"), _mean(lora, "learning_accuracy")
        add("learning accuracy vs lora", la, ll, _ratio(la, ll), ">= 0.9x", _ratio(la, ll) >= 0.9)
        s, sl = _mean(c, "updates", "stale_persistence"), _mean(lora, "updates", "stale_persistence")
        add("stale answers persisting (diff)", s, sl, s - sl, "< lora's (or both 0)", s < sl or s == sl == 0)
        n, nl = _mean(c, "updates", "new_answer_acc"), _mean(lora, "updates", "new_answer_acc")
        add("new answers after updates (diff)", n, nl, n - nl, ">= lora's", n >= nl)
        k, kl = _mean(c, "locality", "kl"), _mean(lora, "locality", "kl")
        add("general-text KL vs lora", k, kl, _ratio(k, kl), "<= 1x", k <= kl)
        ku = _mean(c, "locality", "kl_unrouted")  # a routed c2w: what its weights do with the router off
        add("general-text KL, router off, vs lora", ku, kl, _ratio(ku, kl), "<= 1x", ku <= kl)
    ctrl = _mean(c, "locality", "control_rel")
    add("control accuracy / base", ctrl, 1.0, ctrl, ">= 0.98", ctrl >= 0.98)
    for role, want in (("noise", 0.10), ("known", 0.20), ("duplicate", 0.20)):
        w = _mean(c, "gate", f"written_{role}")
        add(f"{role} records written", w, float("nan"), w, f"<= {want:.2f}", w <= want)
    w = _mean(c, "gate", "written_known_to_base")  # the known records the base really answers
    add("known records the base answers, written", w, float("nan"), w, "<= 0.20", w <= 0.20)
    ng = methods.get(f"{ours}-no-gate")
    if isinstance(ng, dict) and math.isfinite(_mean(c, "gate", "written_noise")):
        a, an = _mean(c, "acc"), _mean(ng, "acc")
        add("final ACC vs no-gate (points)", a, an, 100 * (a - an), ">= -2", 100 * (a - an) >= -2)
        # Write compute leaves out the one-time setup (the router's calibration, the same in both
        # arms, paid once whatever the stream); results from before session 14 have only the total.
        fl, fn = (_mean(c, "cost", "write_flops"), _mean(ng, "cost", "write_flops"))
        if not (math.isfinite(fl) and math.isfinite(fn)):
            fl, fn = _mean(c, "cost", "flops"), _mean(ng, "cost", "flops")
        add("write compute (FLOPs) vs no-gate", fl, fn, _ratio(fl, fn), "<= 0.6x", _ratio(fl, fn) <= 0.6)
    return rows


def targets_markdown(methods: dict) -> list[str]:
    rows = target_rows(methods)
    if not rows:
        return []
    head = "| Target | c2w | reference | measured | wanted | met |\n| :--- | ---: | ---: | ---: | :--- | :--- |"
    body = ["| " + " | ".join(r) + " |" for r in rows]
    return ["## Targets (c2w issue)", "", "Reference: `lora`, or `c2w-no-gate` for the gate's compute; "
            "means over seeds.", "", head, *body, ""]
