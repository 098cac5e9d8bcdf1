"""Continual-learning metrics against hand-computed matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from c2w.evaluation.metrics import (
    aggregate_matrix,
    cl_metrics,
    flip_counts,
    learning_curve_auc,
    mean_std,
    update_metrics,
)

R3 = [[0.8, 0.1, 0.0],
      [0.5, 0.9, 0.2],
      [0.4, 0.6, 0.7]]
B3 = [0.0, 0.1, 0.1]


def test_cl_metrics_hand_computed():
    m = cl_metrics(R3, B3)
    assert set(m) == {"acc", "bwt", "fwt", "forgetting", "learning_accuracy", "retention"}
    assert m["acc"] == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    assert m["bwt"] == pytest.approx(((0.4 - 0.8) + (0.6 - 0.9)) / 2)  # -0.35
    assert m["bwt"] == pytest.approx(-0.35)
    assert m["fwt"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.1)) / 2)  # R[0][1]-b1, R[1][2]-b2
    assert m["fwt"] == pytest.approx(0.05)
    # forgetting: j=0: max(R00, R10)=0.8 -> 0.8-0.4; j=1: max(R11)=0.9 -> 0.9-0.6
    assert m["forgetting"] == pytest.approx(0.35)
    assert m["learning_accuracy"] == pytest.approx((0.8 + 0.9 + 0.7) / 3)
    assert m["retention"] == pytest.approx((0.4 / 0.8 + 0.6 / 0.9) / 2)
    assert all(isinstance(v, float) for v in m.values())


def test_forgetting_max_not_on_diagonal():
    # episode 0 keeps improving after it was learned (R[1][0] > R[0][0]); peak is 0.9, not 0.5
    R = np.array([[0.5, 0.0, 0.0],
                  [0.9, 0.6, 0.0],
                  [0.3, 0.6, 0.8]])
    m = cl_metrics(R, np.zeros(3))
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.6 - 0.6)) / 2)  # 0.3
    assert m["bwt"] == pytest.approx(((0.3 - 0.5) + (0.6 - 0.6)) / 2)  # -0.1: diagonal-based
    assert m["fwt"] == pytest.approx(0.0)
    # forgetting ignores the final row when taking the max: a final-episode gain is not "peak"
    R2 = np.array([[0.2, 0.0], [0.7, 0.5]])
    assert cl_metrics(R2, [0, 0])["forgetting"] == pytest.approx(0.2 - 0.7)


def test_single_episode_and_retention_edge_cases():
    m = cl_metrics([[0.7]], [0.2])
    assert m["acc"] == pytest.approx(0.7) and m["learning_accuracy"] == pytest.approx(0.7)
    for k in ("bwt", "fwt", "forgetting", "retention"):
        assert math.isnan(m[k]), k
    # nothing ever learned before the last episode -> retention undefined
    assert math.isnan(cl_metrics([[0.0, 0.0], [0.3, 0.5]], [0, 0])["retention"])
    # only learned episodes count
    r = cl_metrics([[0.0, 0, 0], [0, 0.5, 0], [0.4, 0.25, 1]], [0, 0, 0])["retention"]
    assert r == pytest.approx(0.5)


@pytest.mark.parametrize("R,base", [
    ([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], [0, 0]),  # not square
    ([0.1, 0.2], [0, 0]),  # 1-D
    ([], []),  # empty
    ([[0.1, 0.2], [0.3]], [0, 0]),  # ragged
    ([[0.1, 0.2], [0.3, 0.4]], [0, 0, 0]),  # base wrong length
    ([[0.1, 0.2], [0.3, 0.4]], [[0, 0]]),  # base not a vector
])
def test_bad_shapes_raise(R, base):
    with pytest.raises(ValueError):
        cl_metrics(R, base)


def test_flip_counts():
    # T=4 evaluations, 3 items
    correct = np.array([[0, 1, 0],
                        [1, 0, 0],
                        [0, 1, 1],
                        [1, 1, 0]], dtype=bool)
    learned_at = np.array([0, 1, 3])
    # item0 from i=0: 0->1 (+), 1->0 (-), 0->1 (+)      : 3 transitions
    # item1 from i=1: 0->1 (+), 1->1                     : 2 transitions (the 1->0 at i=0 is before learning)
    # item2 from i=3: no transition left                 : 0
    f = flip_counts(correct, learned_at)
    assert f["negative"] == 1 and f["positive"] == 3
    assert f["negative_rate"] == pytest.approx(1 / 5)
    assert isinstance(f["negative"], int)
    empty = flip_counts(np.ones((3, 1), bool), np.array([5]))
    assert empty["negative"] == 0 and empty["negative_rate"] == 0.0
    with pytest.raises(ValueError):
        flip_counts(correct, np.array([0, 1]))


def test_learning_curve_auc():
    assert learning_curve_auc([0, 10, 40], [0.3, 0.3, 0.3]) == pytest.approx(0.3)
    assert learning_curve_auc([5], [0.7]) == pytest.approx(0.7)
    # linear 0 -> 1 over [0, 1] -> 0.5; the scale of steps does not matter
    assert learning_curve_auc([0, 100], [0.0, 1.0]) == pytest.approx(0.5)
    # uneven steps: x = [0, 0.25, 1]; (0.25*(0+1) + 0.75*(1+1)) / 2 = 0.875
    assert learning_curve_auc([0, 1, 4], [0.0, 1.0, 1.0]) == pytest.approx(0.875)
    assert learning_curve_auc([3, 3], [0.2, 0.4]) == pytest.approx(0.3)
    assert math.isnan(learning_curve_auc([], []))
    with pytest.raises(ValueError):
        learning_curve_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        learning_curve_auc([0, 1], [0.1])


def test_update_metrics():
    u = update_metrics(np.array([True, False, True, True]), np.array([False, True, True, False]))
    assert u == {"new_answer_acc": 0.75, "stale_persistence": 0.5, "n": 4}
    e = update_metrics(np.array([], bool), np.array([], bool))
    assert math.isnan(e["new_answer_acc"]) and math.isnan(e["stale_persistence"]) and e["n"] == 0
    # an update with a cloze and a question probe, one right, counts half (a bool cast made it 1)
    f = update_metrics(np.array([0.5, 1.0]), np.array([0.5, 0.0]))
    assert f == {"new_answer_acc": 0.75, "stale_persistence": 0.25, "n": 2}
    with pytest.raises(ValueError, match="fractions"):
        update_metrics(np.array([2.0]), np.array([0.0]))


def test_mean_std_nan_aware():
    r = mean_std([0.2, 0.4, float("nan"), None])
    assert r["mean"] == pytest.approx(0.3) and r["std"] == pytest.approx(0.1)  # population std
    assert r["per_seed"] == [0.2, 0.4, None, None]
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "per_seed": [0.5]}
    allnan = mean_std([float("nan")])
    assert math.isnan(allnan["mean"]) and math.isnan(allnan["std"]) and allnan["per_seed"] == [None]
    json.dumps(r["per_seed"], allow_nan=False)


def test_aggregate_matrix():
    a = np.array([[1.0, 0.0], [0.5, float("nan")]])
    b = [[0.0, 0.0], [0.7, None]]
    r = aggregate_matrix([a, b])
    assert np.allclose(r["mean"][0], [0.5, 0.0]) and r["mean"][1][0] == pytest.approx(0.6)
    assert math.isnan(r["mean"][1][1])
    assert np.allclose(r["std"][0], [0.5, 0.0]) and r["std"][1][0] == pytest.approx(0.1)
    assert r["per_seed"] == [[[1.0, 0.0], [0.5, None]], [[0.0, 0.0], [0.7, None]]]
    with pytest.raises(ValueError):
        aggregate_matrix([np.zeros((2, 2)), np.zeros((3, 3))])


def test_an_episode_without_probes_is_left_out_of_every_average():
    """A column of nan is an episode with nothing to score (no probes, or all of them replaced by
    later records): the averages run over the other episodes instead of all turning nan. A nan in a
    column that has values still propagates."""
    nan = math.nan
    R = [[0.5, nan, 0.1],
         [0.4, nan, 0.2],
         [0.3, nan, 0.8]]
    m = cl_metrics(R, [0.0, 0.0, 0.1])
    assert m["acc"] == pytest.approx(0.55)
    assert m["bwt"] == pytest.approx(-0.2)
    assert m["fwt"] == pytest.approx(0.1)
    assert m["forgetting"] == pytest.approx(0.2)
    assert m["learning_accuracy"] == pytest.approx(0.65)
    assert m["retention"] == pytest.approx(0.6)
    holey = [[0.5, 0.2, 0.1], [0.4, nan, 0.2], [0.3, 0.6, 0.8]]
    h = cl_metrics(holey, [0.0, 0.0, 0.1])  # R[1][1] missing: what reads it is nan, the rest is not
    assert math.isnan(h["learning_accuracy"]) and math.isnan(h["bwt"]) and h["acc"] == pytest.approx(0.9 / 3 + 0.8 / 3)
    assert math.isnan(cl_metrics([[0.5, 0.2], [nan, 0.4]], [0.0, 0.0])["acc"])
    assert all(math.isnan(v) for v in cl_metrics([[nan, nan], [nan, nan]], [0.0, 0.0]).values())
