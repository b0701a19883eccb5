"""The vectorised bootstrap AUROC equals scikit-learn's, resample by resample."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from models.metrics import bootstrap_aurocs


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
