"""Metrics agree with scikit-learn; perturbations and the report work end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from models.bundle import Thresholds, load_bundle
from models.data import PERTURBATIONS, Sample, dicom_round_trip
from models.evaluate import (
    at_threshold,
    auroc_ci,
    evaluate_bundle,
    summarize,
    write_report,
)
from models.metrics import reliability
from models.preprocess import Preprocessing

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1])
SCORES = np.array([0.1, 0.3, 0.35, 0.8, 0.4, 0.6, 0.7, 0.9, 0.95, 0.2, 0.05, 0.65])


def test_auroc_and_ci_match_a_plain_sklearn_bootstrap() -> None:
    auroc, low, high = auroc_ci(LABELS, SCORES, n_boot=200, seed=3)
    assert auroc == roc_auc_score(LABELS, SCORES)
    rng = np.random.default_rng(3)
    boots = []
    for _ in range(200):
        index = rng.integers(0, len(LABELS), len(LABELS))
        if len(set(LABELS[index])) == 2:
            boots.append(roc_auc_score(LABELS[index], SCORES[index]))
    assert (low, high) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])))
    assert low <= auroc <= high


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError):
        auroc_ci(np.ones(4), np.linspace(0, 1, 4))


def test_rates_at_a_threshold() -> None:
    rates = at_threshold(LABELS, SCORES, 0.5)
    assert (rates["tp"], rates["fp"], rates["tn"], rates["fn"]) == (5, 1, 4, 2)
    assert rates["sensitivity"] == pytest.approx(5 / 7)
    assert rates["npv"] == pytest.approx(4 / 6)


def test_ece_is_zero_when_frequencies_match() -> None:
    scores = np.repeat([0.25, 0.75], 4)
    labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    ece, bins = reliability(labels, scores)
    assert ece == pytest.approx(0.0)
    assert sum(b["count"] for b in bins) == 8


def test_summary_reports_subgroups() -> None:
    groups = ["normal" if y == 0 else ("virus" if i % 2 else "bacteria") for i, y in enumerate(LABELS)]
    summary = summarize(LABELS, SCORES, Thresholds(critical=0.5, elevated=0.3), groups)
    assert set(summary["subgroups"]) == {"bacteria", "virus"}
    assert summary["critical"]["threshold"] == 0.5


def test_dicom_round_trip_keeps_the_image() -> None:
    gray = np.linspace(0.0, 1.0, 64 * 48, dtype=np.float32).reshape(64, 48) ** 1.5
    back = dicom_round_trip(gray, Preprocessing())
    assert back.shape == gray.shape
    assert np.corrcoef(back.ravel(), gray.ravel())[0, 1] > 0.999


def test_every_perturbation_keeps_a_grey_image() -> None:
    gray = np.random.default_rng(0).random((50, 40)).astype(np.float32)
    for name, perturb in PERTURBATIONS.items():
        out = perturb(gray, Preprocessing())
        assert out.ndim == 2 and out.min() >= 0.0 and out.max() <= 1.0, name


def test_report_on_the_tiny_bundle(tiny_bundle: Path, samples: list[Sample], tmp_path: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    results = evaluate_bundle(bundle, samples, perturbations=("original", "jpeg_q20"), tta=True)
    json_path, png_path = write_report(results, tmp_path, bundle, worst=2)
    assert json_path.stat().st_size > 0 and png_path.stat().st_size > 0
    assert results["original"]["n"] == 4
