"""metrics.py: exact values on hand-computed cases, the tie and NaN rules, agreement with sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamrank import metrics as M
from streamrank.evaluate import id_map, popularity_scores


def test_ranking_metrics_exact():
    ranks = [0, 1, 9, 10, 3]
    assert M.ndcg_at_k(ranks, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11) + 0 + 1 / math.log2(5)) / 5)
    assert M.ndcg_at_k(ranks, 1) == pytest.approx(1 / 5)
    assert M.hit_rate_at_k(ranks, 10) == pytest.approx(4 / 5)
    assert M.hit_rate_at_k(ranks, 3) == pytest.approx(2 / 5)
    assert M.mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 4) / 5)
    assert M.ndcg_at_k([], 10) is None and M.hit_rate_at_k([], 10) is None and M.mrr([]) is None
    with pytest.raises(ValueError):
        M.mrr([-1])


def test_ranks_ties_and_nan_count_against_the_target():
    target = np.array([1.0, 1.0, np.nan, 2.0])
    comp = np.array([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [np.nan, 0.0, 3.0]])
    mask = np.array([[True, True, True], [True, True, False], [True, True, True], [True, True, True]])
    # row 0: 2.0 beats, 1.0 ties (counts) -> 2; row 1: two ties unmasked -> 2;
    # row 2: NaN target loses to all -> 3; row 3: NaN competitor beats, 3.0 beats -> 2
    assert M.ranks_from_scores(target, comp, mask).tolist() == [2, 2, 3, 2]


def test_top_k_and_coverage():
    scores = np.array([[0.1, 0.9, 0.5, np.nan], [3.0, 3.0, 1.0, 2.0]])
    assert M.top_k_indices(scores, 2).tolist() == [[1, 2], [0, 1]]  # NaN last; ties in column order
    assert M.top_k_indices(scores, 2, np.array([[1, 0, 1, 1], [0, 1, 1, 1]], bool)).tolist() == [[2, 0], [1, 3]]
    assert M.catalogue_coverage([[2, 3], [3, 4], [0, 1]], 10) == pytest.approx(0.3)  # pad/unknown ignored
    assert M.catalogue_coverage([], 0) is None


def test_auc_logloss_against_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.random(500) * 0.5 + y * 0.3, 0, 1)
    p[:50] = 0.5  # ties
    assert M.auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert M.log_loss(y, p) == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
    assert M.auc([1, 1], [0.2, 0.3]) is None  # one class: undefined, not 0.5
    assert M.auc([0, 1, 0, 1], [0.1, 0.1, 0.1, 0.1]) == pytest.approx(0.5)
    assert M.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))


def test_ece_exact():
    # bin [0.1,0.2): p 0.1, 0.1, y 0, 1 -> |0.1 - 0.5| * 2/5
    # bin [0.9,1.0]: p 0.9, 0.95, 1.0, y 1, 1, 1 -> |0.95 - 1| * 3/5
    y = [0, 1, 1, 1, 1]
    p = [0.1, 0.1, 0.9, 0.95, 1.0]
    assert M.ece(y, p, 10) == pytest.approx(0.4 * 2 / 5 + 0.05 * 3 / 5)
    assert M.ece([0, 1], [0.0, 1.0]) == pytest.approx(0.0)
    assert M.ece([], []) is None
    table = M.calibration_table(y, p, 10)
    assert [(r["bin"], r["count"]) for r in table] == [(1, 2), (9, 3)]


def test_precision_recall_f1_exact():
    y = [1, 1, 0, 0, 1]
    p = [0.9, 0.4, 0.6, 0.1, 0.5]  # threshold 0.5: predicted 1 at rows 0, 2, 4 -> TP 2, FP 1, FN 1
    got = M.precision_recall_f1(y, p, 0.5)
    assert got == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}
    none = M.precision_recall_f1([1, 0], [0.1, 0.2], 0.5)  # nobody predicted: zero_division -> 0
    assert none == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.precision_recall_f1([], [], 0.5)["f1"] is None


def test_id_map_translates_through_tokens():
    src = {"<pad>": 0, "<unk>": 1, "A": 2, "B": 3, "NEW": 4}
    dst = {"<pad>": 0, "<unk>": 1, "B": 2, "A": 3}
    assert id_map(src, dst).tolist() == [0, 1, 3, 2, 1]  # NEW is unknown to the model


def test_popularity_tie_break_never_crosses_counts():
    s = popularity_scores(np.array([0.0, 0.0, 3.0, 1.0, 1.0, 0.0]))
    assert s[2] > s[3] > s[4] > s[5]
    assert s[4] > s[5] + 0.4 and s[3] - s[4] < 1.0
