"""tools/observable_ceiling.py: the diagnostic's features say what the history says."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import observable_ceiling as oc  # noqa: E402

from streamrank.evaluate import Holdout  # noqa: E402


def _holdout() -> Holdout:
    """Two viewers with the same left-padded history of four events (products 2, 3, 2, 4)."""
    b, length, n = 2, 5, 3
    zeros = lambda *shape: np.zeros(shape, np.int64)  # noqa: E731
    return Holdout(
        viewer_id=np.array(["a", "b"], dtype=object),
        hist_product=np.array([[0, 2, 3, 2, 4]] * b), hist_category=np.array([[0, 5, 6, 5, 7]] * b),
        hist_event=np.array([[0, 4, 5, 9, 11]] * b), hist_dwell=zeros(b, length),
        hist_dt=np.array([[0, 100, 50, 10, 1]] * b, np.float32), hist_len=np.array([4, 4]),
        pp_features=np.zeros((b, 8), np.float32), target_product=np.array([2, 3]), target_products=zeros(b, 2),
        cand_products=np.array([[2, 3, 4]] * b), label_purchase=np.array([0, 1]),
        hist_host=zeros(b, length), hist_hour=zeros(b, length), cand_host=zeros(b, n), cand_hour=zeros(b, n),
    )


def test_pair_features_count_the_candidates_category_and_product_in_the_history():
    category = np.array([0, 0, 5, 6, 7, 0])
    features = oc.PairFeatures(counts=np.array([0, 0, 9, 1, 0, 0.0]), category=category,
                               brand=np.zeros(6, np.int64), price=np.ones(6))
    x = features(_holdout(), np.array([0, 1]), np.array([0, 1]))  # candidate 2 for viewer a, 3 for b
    assert x.shape == (2, 46)
    np.testing.assert_allclose(x[:, 0], np.log1p([9.0, 1.0]))  # popularity
    np.testing.assert_allclose(x[:, 1], [0.5, 0.25])  # share of the 4 events in the candidate's category
    np.testing.assert_allclose(x[:, 2], [10.0, 50.0])  # hours since the latest event in that category
    assert x[0, 15] == 2 and x[1, 15] == 1  # events on the candidate product itself


def test_sequence_counts_see_recent_activity_and_active_days():
    counts = oc._sequence_counts(_holdout())
    # hist_len, events in the last 24/72/168 h, active days, latest and oldest event age
    np.testing.assert_allclose(counts[0, :7], [4, 2, 3, 4, 3, 1, 100])
