"""The vectorised bootstrap AUROC equals scikit-learn's; the one ECE matches a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.metrics import bootstrap_aurocs, reliability


def test_each_resample_matches_roc_auc_score_with_ties_and_single_class_draws() -> None:
    rng = np.random.default_rng(1)
    labels = (rng.random(9) < 0.25).astype(int)  # few positives: some resamples have none
    scores = np.round(rng.random(9), 1)  # ties
    draws = np.random.default_rng(3)
    expected = []
    for _ in range(150):
        pick = draws.integers(0, len(labels), len(labels))
        if len(set(labels[pick].tolist())) == 2:
            expected.append(roc_auc_score(labels[pick], scores[pick]))
    got = bootstrap_aurocs(labels, scores, rounds=150, seed=3, chunk=7)  # chunks do not divide 150
    assert 0 < len(got) < 150
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_ece_matches_a_hand_computed_case_with_scores_on_bin_edges() -> None:
    # Bins [0.0, 0.1) ... [0.9, 1.0]: 0.3 opens [0.3, 0.4); 1.0 falls in the last bin.
    scores = np.array([0.05, 0.3, 0.3, 0.35, 0.7, 1.0])
    labels = np.array([0, 0, 1, 1, 1, 1])
    # [0.0, 0.1): 1 case, mean 0.05, observed 0   -> 1 * 0.05
    # [0.3, 0.4): 3 cases, mean 0.95/3, observed 2/3 -> 3 * |0.31667 - 0.66667| = 1.05
    # [0.7, 0.8): 1 case, mean 0.7, observed 1   -> 1 * 0.3
    # [0.9, 1.0]: 1 case, mean 1.0, observed 1   -> 0
    ece, bins = reliability(labels, scores)
    assert ece == pytest.approx((0.05 + 1.05 + 0.3) / 6)
    assert [b["count"] for b in bins] == [1, 0, 0, 3, 0, 0, 0, 1, 0, 1]
    assert bins[3]["confidence"] == pytest.approx(0.95 / 3) and bins[3]["frequency"] == pytest.approx(2 / 3)
    assert reliability(np.zeros(0), np.zeros(0))[0] == 0.0


def test_monitoring_reports_the_same_ece() -> None:
    from triage_api.monitoring import calibration

    scores = np.array([0.05, 0.3, 0.3, 0.35, 0.7, 1.0])
    labels = np.array([0, 0, 1, 1, 1, 1])
    result = calibration(scores, labels)
    assert result["ece"] == reliability(labels, scores)[0]
    assert [b["n"] for b in result["bins"]] == [1, 3, 1, 1]
