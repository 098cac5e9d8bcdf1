"""Aggregation over seeds and the markdown/PNG report on a fake results dict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from c2w.evaluation.metrics import aggregate_matrix, mean_std
from c2w.report import aggregate_runs, jsonable, render_markdown, write_report
from c2w.report.markdown import GROUPS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _run(seed: int, acc: float) -> dict:
    R = (np.eye(3) * 0.8 + 0.1 * seed).tolist()
    return {
        "group": "c2w",
        "accuracy_matrix": R,
        "base_accuracy": [0.0, 0.1, 0.1],
        "acc": acc,
        "bwt": None if seed == 1 else -0.2,
        "cost": {"wall_s": 10.0 + 2 * seed, "trained_tokens": 1000},
        "learning_speed": {"steps": [0, 10, 20][: 2 + seed], "acc": [0.1, 0.5, 0.9][: 2 + seed], "auc": 0.5},
        "note": "same",
    }


def test_aggregate_runs_two_seeds():
    out = aggregate_runs([_run(0, 0.2), _run(1, 0.4)])
    assert out["group"] == "c2w" and out["note"] == "same"
    assert out["acc"]["mean"] == pytest.approx(0.3) and out["acc"]["std"] == pytest.approx(0.1)
    assert out["acc"]["per_seed"] == [0.2, 0.4]
    assert out["bwt"]["mean"] == pytest.approx(-0.2) and out["bwt"]["std"] == 0.0
    assert out["bwt"]["per_seed"] == [-0.2, None]
    assert out["cost"]["wall_s"] == mean_std([10.0, 12.0])
    assert out["cost"]["trained_tokens"]["mean"] == 1000
    R = np.array(out["accuracy_matrix"]["mean"])
    assert R.shape == (3, 3) and R[0, 0] == pytest.approx(0.85) and R[0, 1] == pytest.approx(0.05)
    assert np.allclose(out["accuracy_matrix"]["std"], 0.05)
    assert out["base_accuracy"] == aggregate_matrix([[0.0, 0.1, 0.1]] * 2)
    # ragged curves (2 vs 3 points) are nan-padded, not dropped
    ls = out["learning_speed"]
    assert ls["steps"]["mean"][:2] == [0.0, 10.0] and ls["steps"]["mean"][2] == 20.0
    assert ls["acc"]["per_seed"][0] == [0.1, 0.5, None]
    assert ls["auc"]["mean"] == 0.5


def test_jsonable_gives_strict_json():
    import json
    tree = {1: np.array([1.0, NAN]), "b": (np.float32(0.5), np.int64(3), np.bool_(True)), "c": float("inf"), "d": "x"}
    out = jsonable(tree)
    assert out == {"1": [1.0, None], "b": [0.5, 3, True], "c": None, "d": "x"}
    json.loads(json.dumps(out, allow_nan=False))  # no NaN or Infinity tokens left


def test_aggregate_runs_missing_keys_and_strings():
    out = aggregate_runs([{"a": 1.0, "s": "x", "d": {"k": 2}}, {"s": "y", "d": {}}])
    assert out["a"]["per_seed"] == [1.0, None] and out["a"]["mean"] == 1.0
    assert out["s"] == {"per_seed": ["x", "y"]}
    assert out["d"]["k"]["mean"] == 2.0
    nan_only = aggregate_runs([{"a": NAN}, {"a": None}])["a"]
    assert math.isnan(nan_only["mean"]) and nan_only["per_seed"] == [None, None]
    assert aggregate_runs([]) == {}


def _agg(*vals):
    return mean_std(list(vals))


def _mat(*mats):
    return aggregate_matrix([np.asarray(m, dtype=float) for m in mats])


def fake_results() -> dict:
    R_a = [[0.8, 0.1, 0.0], [0.5, 0.9, 0.2], [0.4, 0.6, 0.7]]
    R_b = [[0.7, 0.0, 0.0], [0.6, 0.8, 0.1], [0.5, 0.7, 0.9]]
    full = {
        "group": "c2w",
        "accuracy_matrix": _mat(R_a, R_b),
        "base_accuracy": _mat([0.0, 0.1, 0.1], [0.0, 0.1, 0.1]),
        "acc": _agg(0.567, 0.7), "bwt": _agg(-0.35, -0.15), "fwt": _agg(0.05, NAN),
        "forgetting": _agg(0.35, 0.15), "learning_accuracy": _agg(0.8, 0.8), "retention": _agg(0.58, 0.8),
        "strict": {"acc": _agg(0.5, 0.6), "learning_accuracy": _agg(0.7, 0.7)},
        "logprob": {"final_mean": _agg(-1.2, -1.4), "matrix": _mat(R_a, R_b)},
        "flips": {"negative": _agg(3, 4), "positive": _agg(5, 5)},
        "updates": {"new_answer_acc": _agg(0.5, 0.5), "stale_persistence": _agg(0.25, 0.5), "n": _agg(4, 4)},
        "locality": {"control_acc": _agg(0.3, 0.3), "control_rel": _agg(0.95, 1.0), "kl": _agg(0.01, 0.02),
                     "ppl_ratio": _agg(1.01, 1.03)},
        "learning_speed": {"auc": _agg(0.6, 0.7), "steps": _mat([0, 10, 20], [0, 10, 20]),
                           "acc": _mat([0.1, 0.6, 0.8], [0.2, 0.7, 0.9])},
        "gate": {"written_noise": _agg(0.1, 0.0), "written_known": _agg(0.2, 0.1),
                 "written_duplicate": _agg(0.0, 0.0), "written_learn": _agg(1.0, 0.9)},
        "cost": {"trained_tokens": _agg(12000, 12000), "flops": _agg(1.2e12, 1.3e12), "wall_s": _agg(95.0, 105.0),
                 "train_s": _agg(60.0, 70.0), "peak_mem_mb": _agg(2048.0, 2048.0),
                 "trainable_params": _agg(1.6e6, 1.6e6), "state_bytes_per_record": _agg(3.2e6, 3.2e6),
                 "probe_latency_ratio": _agg(1.0, 1.0)},
    }
    frozen = {  # a baseline missing most keys, with nans
        "group": "baseline",
        "accuracy_matrix": _mat([[0.1, 0.1, 0.1]] * 3),
        "acc": _agg(0.1), "bwt": _agg(0.0), "forgetting": _agg(NAN), "learning_accuracy": _agg(0.1),
        "cost": {"wall_s": _agg(5.0), "trained_tokens": _agg(0)},
    }
    rag = {"group": "reference", "acc": _agg(0.9, 0.92), "forgetting": _agg(0.0, 0.0),
           "learning_accuracy": _agg(0.95, 0.95), "cost": {"trained_tokens": _agg(0, 0), "wall_s": _agg(30.0, 31.0)},
           "locality": None}
    return {"config": {"stream": {"name": "synthetic-facts", "path": "x.jsonl"}, "model": "SmolLM2-135M",
                       "seeds": [0, 1], "preset": "smoke", "probe_format": "cloze"},
            "provenance": {"device": "cpu", "git": "abc123"},
            "methods": {"rag": rag, "c2w_sleep": full, "frozen": frozen}}


def test_render_markdown_tables_and_rows():
    md = render_markdown(fake_results())
    for gname, _ in GROUPS:
        assert f"## {gname}" in md
    for name in ("c2w_sleep", "frozen", "rag (reference)"):
        assert f"| {name} |" in md
    # reference listed last in each table
    cl = md.split("## Continual learning")[1].split("##")[0]
    assert cl.index("c2w_sleep") < cl.index("frozen") < cl.index("rag (reference)")
    assert "0.633 ± 0.067" in md  # ACC mean ± std, 3 decimals
    assert "1.2e12" in md  # flops, human units
    assert "synthetic-facts" in md and "SmolLM2-135M" in md and "cloze" in md and "`cpu`" in md
    assert "## How to read this" in md and "**BWT**" in md
    assert "### c2w_sleep" in md  # accuracy-matrix table
    assert "–" in md  # missing / nan cells


def test_render_markdown_survives_garbage():
    assert "# " in render_markdown({})
    md = render_markdown({"methods": {"x": {}, "y": {"acc": None, "cost": 3, "accuracy_matrix": [[1, 2], [3]]}}})
    assert "| x |" in md and "| y |" in md


def test_write_report(tmp_path):
    path = write_report(fake_results(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.md" and path.stat().st_size > 0
    md = path.read_text()
    for png in ("accuracy_matrix.png", "retention.png", "learning_vs_forgetting.png", "cost_vs_accuracy.png",
                "learning_speed.png"):
        f = tmp_path / "out" / png
        assert f.stat().st_size > 100, png
        assert f.read_bytes()[:8] == PNG_MAGIC, png
        assert f"]({png})" in md
    # no data -> no figures, no crash, and nothing embedded
    p2 = write_report({"methods": {"a": {"group": "c2w"}}}, tmp_path / "empty")
    assert list((tmp_path / "empty").glob("*.png")) == [] and "![" not in p2.read_text()
