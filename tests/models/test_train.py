"""The training pipeline: patients, split, augmentation, freezing, a tiny real run, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle, save_bundle, verify_bundle
from models.preprocess import Preprocessing
from models.pretrained import pretrained_network
from models.train import (
    Augment,
    Sample,
    TrainConfig,
    fit,
    freeze_early,
    parameter_groups,
    patient_id,
    split_by_patient,
)


@pytest.mark.parametrize(
    ("name", "patient"),
    [
        ("person1003_bacteria_2934.jpeg", "person1003"),
        ("person1003_virus_1685.jpeg", "person1003"),
        ("IM-0439-0001-0002.jpeg", "IM-0439"),
        ("NORMAL2-IM-0396-0001.jpeg", "NORMAL2-IM-0396"),
        ("scan.dcm", "scan"),
    ],
)
def test_patient_id(name: str, patient: str) -> None:
    assert patient_id(Path(name)) == patient


def _fake_samples() -> list[Sample]:
    samples = []
    for p in range(60):
        label = int(p % 3 != 0)
        for image in range(1 + p % 3):
            samples.append(Sample(Path(f"p{p}_{image}.png"), label, f"p{p}", "x"))
    return samples


def test_split_keeps_patients_together_and_is_deterministic() -> None:
    samples = _fake_samples()
    parts = split_by_patient(samples, (0.6, 0.2, 0.2), seed=1)
    assert parts == split_by_patient(samples, (0.6, 0.2, 0.2), seed=1)
    assert parts != split_by_patient(samples, (0.6, 0.2, 0.2), seed=2)
    patients = [{s.patient for s in part} for part in parts]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    assert sum(len(part) for part in parts) == len(samples)
    assert all({s.label for s in part} == {0, 1} for part in parts)
    with pytest.raises(ValueError):
        split_by_patient(samples, (0.5, 0.2), seed=0)


def test_augment_is_seeded_and_stays_in_range() -> None:
    gray = np.random.default_rng(0).random((224, 224)).astype(np.float32)
    first = Augment()(gray, np.random.default_rng(5))
    assert np.array_equal(first, Augment()(gray, np.random.default_rng(5)))
    assert first.shape == gray.shape and first.min() >= 0.0 and first.max() <= 1.0


def test_freezing_and_discriminative_rates() -> None:
    network = pretrained_network("tf_efficientnet_lite0", num_classes=2)
    frozen = freeze_early(network, 4)
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for p in network.blocks[4].parameters())
    groups, head = parameter_groups(network, lr=1e-3, decay=0.5, weight_decay=0.01)
    rates = [g["lr"] for g in groups]
    assert rates == sorted(rates, reverse=True) and rates[0] == 1e-3 and len(groups) == 4
    assert any(p is network.classifier.weight for p in head)
    with pytest.raises(ValueError):
        freeze_early(network, 99)


def test_tiny_run_makes_a_verified_bundle_and_resumes(samples: list[Sample], tmp_path: Path) -> None:
    config = TrainConfig(
        preprocessing=Preprocessing(input_size=64), epochs=1, head_epochs=0, batch_size=2, lr=1e-3, threads=2
    )
    run_dir = tmp_path / "run"
    result = fit(config, samples, samples, run_dir)
    assert [h["epoch"] for h in result.history] == [1] and (run_dir / "epoch-1.pt").is_file()
    card = save_bundle(
        tmp_path / "bundle",
        {
            "name": "tiny-trained",
            "version": "0.0.1",
            "architecture": config.architecture,
            "labels": config.labels,
            "positive_label": "pneumonia",
            "preprocessing": config.preprocessing,
            "thresholds": {"critical": 0.5, "elevated": 0.4},
            "intended_use": {"summary": "test"},
        },
        result.network.state_dict(),
    )
    assert verify_bundle(tmp_path / "bundle").weights_sha256 == card.weights_sha256
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.predict(torch.zeros(1, 3, 64, 64)).shape == (1,)

    resumed = fit(config, samples, samples, run_dir, resume=True)
    assert resumed.history == result.history
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            resumed.network.state_dict().values(), result.network.state_dict().values(), strict=True
        )
    )
