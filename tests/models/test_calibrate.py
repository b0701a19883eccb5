"""Temperature scaling and tier thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.calibrate import (
    calibrated_scores,
    fit_calibration,
    fold_bias,
    nll,
    operating_points,
    shift_logits,
    threshold_for_sensitivity,
)
from models.pretrained import pretrained_network


def _overconfident(n: int = 2000, factor: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from well-calibrated logits, then the logits scaled up ``factor`` times."""
    rng = np.random.default_rng(0)
    margin = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-margin))).astype(int)
    logits = np.stack([np.zeros(n), margin * factor], axis=1)
    return logits, labels


def test_temperature_lowers_nll_and_recovers_the_scale() -> None:
    logits, labels = _overconfident()
    calibration = fit_calibration(logits, labels, positive_index=1, fit_bias=False)
    assert calibration.bias == 0.0
    assert nll(logits, labels, calibration.temperature) < nll(logits, labels) - 0.1
    assert calibration.temperature == pytest.approx(4.0, rel=0.15)


def test_bias_undoes_a_prior_shift() -> None:
    logits, labels = _overconfident()
    shifted = shift_logits(logits, 1, -6.0)  # e.g. a class-balanced loss moving the prior
    calibration = fit_calibration(shifted, labels, positive_index=1)
    assert calibration.bias == pytest.approx(6.0, rel=0.15)
    fixed = shift_logits(shifted, 1, calibration.bias)
    plain = fit_calibration(shifted, labels, positive_index=1, fit_bias=False)
    assert nll(fixed, labels, calibration.temperature) < nll(shifted, labels, plain.temperature) - 0.05


def test_fold_bias_shifts_only_the_positive_logit() -> None:
    network = pretrained_network("tf_efficientnet_lite0", num_classes=2).eval()
    inputs = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        before = network(inputs)
        fold_bias(network, 1, 0.75)
        after = network(inputs)
    assert torch.allclose(after - before, torch.tensor([[0.0, 0.75]]), atol=1e-5)


def test_calibration_refuses_empty_input() -> None:
    with pytest.raises(ValueError):
        fit_calibration(np.zeros((0, 2)), np.zeros(0), positive_index=1)


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
    scores = calibrated_scores(logits, fit_calibration(logits, labels, 1).temperature, 1)
    points = operating_points(scores, labels)
    assert points.thresholds.elevated <= points.thresholds.critical
    assert points.critical_sensitivity >= 0.95
    assert points.elevated_sensitivity >= 0.99
    assert "0.95" in points.thresholds.rationale
