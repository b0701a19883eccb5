"""The committed default bundle: verifies, describes itself, scores real images sensibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from models.bundle import Bundle, verify_bundle
from models.preprocess import gray_from_dicom, to_input
from models.train import Sample, load_gray


def test_card_is_complete(default_bundle_dir: Path) -> None:
    card = verify_bundle(default_bundle_dir)
    assert card.labels == ("normal", "pneumonia") and card.positive_label == "pneumonia"
    assert card.architecture == "tf_efficientnet_lite0"
    assert card.thresholds.elevated <= card.thresholds.critical
    assert "10.17632/rscbjbr9sj.2" in card.data_provenance and "CC BY 4.0" in card.data_provenance
    assert card.intended_use.population == "children aged 1-5"
    assert {"validation", "heldout_test"} <= set(card.validation_metrics)
    assert card.validation_metrics["validation"]["auroc_ci95"][0] > 0.9
    assert card.training["seed"] == 0 and card.training["command"].startswith("python -m models.cli train")
    assert card.limitations


def test_scores_a_real_chest_dicom(default_bundle: Bundle, chest_dicom: Path) -> None:
    ds = pydicom.dcmread(chest_dicom)
    pre = default_bundle.card.preprocessing
    score = default_bundle.predict(to_input(gray_from_dicom(ds, ds.pixel_array, pre), pre)[None])
    assert score.shape == (1,) and 0.0 <= score[0] <= 1.0


def test_ranks_pneumonia_above_normal(default_bundle: Bundle, samples: list[Sample]) -> None:
    pre = default_bundle.card.preprocessing
    scores = default_bundle.predict(np.stack([to_input(load_gray(s.path, pre), pre) for s in samples]))
    labels = np.array([s.label for s in samples])
    assert scores[labels == 1].min() > scores[labels == 0].max()
    assert scores[labels == 1].min() >= default_bundle.card.thresholds.elevated
