"""``build_bundle`` end to end on a tiny archive: two members, hard-split calibration, a full card."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.bundle import load_bundle, verify_bundle
from models.data import list_folder
from models.pipeline import BuildConfig, balanced_subset, build_bundle, stratified_draw
from models.preprocess import Preprocessing
from models.train import TrainConfig
from tests.models.conftest import LABELS, MODELS_DATA


def _tiny_archive(root: Path) -> Path:
    """24 images named like the archive's four acquisition series (copies of the 4 samples)."""
    normal, pneumonia = (
        sorted((MODELS_DATA / "NORMAL").iterdir()),
        sorted((MODELS_DATA / "PNEUMONIA").iterdir()),
    )
    for n in range(1, 7):
        (root / "NORMAL").mkdir(parents=True, exist_ok=True)
        (root / "PNEUMONIA").mkdir(parents=True, exist_ok=True)
        shutil.copy(normal[0], root / "NORMAL" / f"IM-{n:04d}-0001.jpeg")
        shutil.copy(normal[1], root / "NORMAL" / f"NORMAL2-IM-{n:04d}-0001.jpeg")
        shutil.copy(pneumonia[0], root / "PNEUMONIA" / f"person{n}_bacteria_{n}.jpeg")
        shutil.copy(pneumonia[1], root / "PNEUMONIA" / f"person{100 + n}_virus_{n}.jpeg")
    return root


def test_build_bundle_writes_a_verified_two_member_bundle(tmp_path: Path) -> None:
    data = _tiny_archive(tmp_path / "data")
    member = {
        "preprocessing": Preprocessing(input_size=64),
        "epochs": 1,
        "head_epochs": 0,
        "batch_size": 2,
        "lr": 1e-3,
        "threads": 2,
    }
    config = BuildConfig(
        data=data,
        out=tmp_path / "bundle",
        run_dir=tmp_path / "run",
        name="tiny-pipeline",
        version="0.0.1",
        members=[TrainConfig(seed=0, **member), TrainConfig(seed=1, **member)],  # type: ignore[arg-type]
        card={"intended_use": {"summary": "plumbing tests only"}},
        hard_fraction=0.34,
        valid_fraction=0.25,
        perturbations=("original", "border_right_white"),
        perturbation_images=8,
        command="python -m models.cli train ...",
    )
    card = build_bundle(config)
    assert verify_bundle(config.out).members == card.members and len(card.members) == 2
    metrics = card.validation_metrics
    assert {"patient_validation", "hard_validation", "hard_validation_perturbed", "calibration"} <= set(
        metrics
    )
    assert set(metrics["hard_validation_perturbed"]) == {"original", "border_right_white"}
    assert metrics["hard_validation_perturbed_images"] == 8
    split = card.training["split"]
    assert (
        split["hard_validation"]["images"] == 12  # the 3 earliest of each series' 6 patients
        and split["train"]["images"] + split["patient_validation"]["images"] == 12
    )
    assert [m["config"]["seed"] for m in card.training["members"]] == [0, 1]
    assert card.thresholds.elevated <= card.thresholds.critical
    bundle = load_bundle(config.out)
    images = list_folder(MODELS_DATA, LABELS)
    assert bundle.predict(np.zeros((len(images), 3, 64, 64), dtype=np.float32)).shape == (4,)
    with pytest.raises(ValueError, match="share labels"):
        build_bundle(
            BuildConfig(
                **{
                    **config.__dict__,
                    "members": [TrainConfig(**member), TrainConfig(**member, labels=("a", "b"))],
                }  # type: ignore[arg-type]
            )
        )


def test_balanced_subset_and_stratified_draw() -> None:
    labels = np.array([1] * 9 + [0] * 3)
    subset = balanced_subset(labels)
    assert len(subset) == 6 and labels[subset].sum() == 3
    samples = list_folder(MODELS_DATA, LABELS) * 3
    drawn = stratified_draw(samples, 6, seed=0)
    assert len(drawn) == 6 and sum(s.label for s in drawn) == 3
    assert stratified_draw(samples, 50, seed=0) == samples
