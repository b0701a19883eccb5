"""The committed default bundle: verifies, describes itself, scores real images sensibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from models.bundle import Bundle, load_bundle, verify_bundle
from models.data import Sample, load_gray
from models.preprocess import gray_from_dicom, to_input
from tests.models.conftest import TESTS_DATA
from triage_api.settings import DEFAULT_BUNDLE

PREVIOUS_BUNDLE = Path(__file__).parents[2] / "models" / "bundles" / "cxr-pneumonia-lite0"
SECOND_BUNDLE = Path(__file__).parents[2] / "models" / "bundles" / "cxr-pneumonia-2.0.0"


def test_card_is_complete(default_bundle_dir: Path) -> None:
    card = verify_bundle(default_bundle_dir)
    assert card.ref == "cxr-pneumonia@2.1.0"
    assert card.labels == ("normal", "pneumonia") and card.positive_label == "pneumonia"
    assert card.architecture == "tf_efficientnet_lite0"
    assert card.thresholds.elevated <= card.thresholds.critical
    assert "10.17632/rscbjbr9sj.2" in card.data_provenance and "CC BY 4.0" in card.data_provenance
    assert card.intended_use.population == "children aged 1-5"
    metrics = card.validation_metrics
    assert {"how_measured", "patient_validation", "hard_validation", "hard_validation_perturbed"} <= set(
        metrics
    )
    assert metrics["hard_validation"]["auroc_ci95"][0] > 0.9
    assert card.training["seed"] == 0 and card.training["command"].startswith("python -m models.cli train")
    # An ensemble of two Lite0 networks, each verified by its own checksum.
    assert [m.architecture for m in card.networks] == ["tf_efficientnet_lite0"] * 2
    assert len({m.sha256 for m in card.networks}) == 2
    assert card.limitations
    assert all((default_bundle_dir / m.file).stat().st_size <= 20_000_000 for m in card.networks)


def test_the_service_serves_it_by_default_and_the_previous_bundle_still_loads(
    default_bundle_dir: Path,
) -> None:
    assert DEFAULT_BUNDLE.resolve() == default_bundle_dir.resolve()
    for path, ref in ((PREVIOUS_BUNDLE, "cxr-pneumonia-lite0@1.0.0"), (SECOND_BUNDLE, "cxr-pneumonia@2.0.0")):
        previous = load_bundle(path)
        assert previous.card.ref == ref
        assert previous.predict(np.zeros((1, 3, 224, 224), dtype=np.float32)).shape == (1,)


def test_scores_a_real_chest_dicom(default_bundle: Bundle, chest_dicom: Path) -> None:
    ds = pydicom.dcmread(chest_dicom)
    pre = default_bundle.card.preprocessing
    score = default_bundle.predict(to_input(gray_from_dicom(ds, ds.pixel_array, pre), pre)[None])
    assert score.shape == (1,) and 0.0 <= score[0] <= 1.0


def test_ranks_pneumonia_above_normal(default_bundle: Bundle, samples: list[Sample]) -> None:
    pre = default_bundle.card.preprocessing
    normal_jpeg = Sample(TESTS_DATA / "cxr_normal.jpeg", 0, "IM-0115", "normal")
    shipped = [*samples, normal_jpeg]
    scores = default_bundle.predict(np.stack([to_input(load_gray(s.path, pre), pre) for s in shipped]))
    labels = np.array([s.label for s in shipped])
    assert scores[labels == 1].min() > scores[labels == 0].max()
    assert scores[labels == 1].min() >= default_bundle.card.thresholds.elevated
