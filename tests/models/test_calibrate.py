"""Temperature scaling and tier thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibrate import (
    calibrated_scores,
    fit_temperature,
    nll,
    operating_points,
    threshold_for_sensitivity,
)


def _overconfident(n: int = 2000, factor: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from well-calibrated logits, then the logits scaled up ``factor`` times."""
    rng = np.random.default_rng(0)
    margin = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(int)
    logits = np.stack([np.zeros(n), margin * factor], axis=1)
    return logits, labels


def test_temperature_lowers_nll_and_recovers_the_scale() -> None:
    logits, labels = _overconfident()
    temperature = fit_temperature(logits, labels)
    assert nll(logits, labels, temperature) < nll(logits, labels) - 0.1
    assert temperature == pytest.approx(4.0, rel=0.15)


def test_temperature_refuses_empty_input() -> None:
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 2)), np.zeros(0))


def test_calibrated_scores_match_softmax() -> None:
    scores = calibrated_scores(np.array([[0.0, 2.0]]), 2.0, positive_index=1)
    assert scores[0] == pytest.approx(1.0 / (1.0 + np.exp(-1.0)))


def test_threshold_is_the_highest_meeting_the_sensitivity() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    labels = np.array([0, 0, 1, 0, 1, 1, 1, 1, 1, 1])
    # 7 positives; sensitivity >= 0.85 needs 6 of them: the 6th highest positive is 0.5.
    assert threshold_for_sensitivity(scores, labels, 0.85) == 0.5
    assert threshold_for_sensitivity(scores, labels, 1.0) == 0.3


def test_operating_points_are_ordered_and_meet_their_targets() -> None:
    logits, labels = _overconfident()
    scores = calibrated_scores(logits, fit_temperature(logits, labels), 1)
    points = operating_points(scores, labels)
    assert points.thresholds.elevated <= points.thresholds.critical
    assert points.critical_sensitivity >= 0.95
    assert points.elevated_sensitivity >= 0.99
    assert "0.95" in points.thresholds.rationale
