"""Training: patients, the two splits, balanced epochs, augmentation, freezing, a tiny real run, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from models.bundle import load_bundle, save_bundle, verify_bundle
from models.data import (
    Augment,
    Sample,
    acquisition_series,
    balanced_epoch,
    list_samples,
    patient_id,
    split_by_acquisition,
    split_by_patient,
    validation_splits,
)
from models.preprocess import Preprocessing
from models.pretrained import pretrained_network
from models.train import (
    TrainConfig,
    eval_loader,
    fit,
    freeze_early,
    parameter_groups,
    positive_auroc,
    predict_logits,
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


def _archive_like() -> list[Sample]:
    """Names in the archive's four acquisition series, 10 patients each, numbered 1..10."""
    samples = []
    for number in range(1, 11):
        for series, label in (("IM-{:04d}-0001", 0), ("NORMAL2-IM-{:04d}-0001", 0)):
            name = series.format(number) + ".jpeg"
            samples.append(Sample(Path(name), label, patient_id(Path(name)), "normal"))
        for word in ("bacteria", "virus"):
            name = f"person{number + (0 if word == 'bacteria' else 100)}_{word}_{number}.jpeg"
            samples.append(Sample(Path(name), 1, patient_id(Path(name)), word))
    return samples


def test_acquisition_series_from_file_names() -> None:
    def series(name: str, subgroup: str = "normal") -> tuple[str, int]:
        return acquisition_series(Sample(Path(name), 0, patient_id(Path(name)), subgroup))

    assert series("IM-0115-0001.jpeg") == ("IM", 115)
    assert series("NORMAL2-IM-0383-0001.jpeg") == ("NORMAL2-IM", 383)
    assert series("person12_virus_44.jpeg", "virus") == ("virus", 12)
    assert series("scan.dcm") == ("other", 0)


def test_hard_split_holds_out_the_earliest_batches_of_every_series() -> None:
    samples = _archive_like()
    kept, held = split_by_acquisition(samples, 0.2)
    assert len(kept) + len(held) == len(samples)
    assert not {s.patient for s in kept} & {s.patient for s in held}
    # the two lowest numbers of each of the four series, nothing else
    assert sorted(acquisition_series(s) for s in held) == sorted(
        [(name, n) for name in ("IM", "NORMAL2-IM", "bacteria") for n in (1, 2)]
        + [("virus", 101), ("virus", 102)]
    )
    assert {s.label for s in held} == {0, 1}
    with pytest.raises(ValueError):
        split_by_acquisition(samples, 1.0)
    train, valid, hard = validation_splits(samples, 0.2, 0.25, seed=0)
    assert hard == held and sorted(train + valid, key=lambda s: str(s.path)) == kept
    assert not {s.patient for s in train} & {s.patient for s in valid}


def test_balanced_epoch_takes_every_rare_image_and_as_many_common_ones() -> None:
    samples = _fake_samples()  # 20 negatives, 100 positives
    order = balanced_epoch(samples, seed=0, epoch=3)
    labels = [samples[i].label for i in order]
    assert labels.count(0) == labels.count(1) == 20
    assert {i for i in order if samples[i].label == 0} == {i for i, s in enumerate(samples) if s.label == 0}
    assert order == balanced_epoch(samples, seed=0, epoch=3) and order != balanced_epoch(samples, 0, 4)


def test_augment_flips_only_horizontally() -> None:
    gray = np.zeros((64, 64), dtype=np.float32)
    gray[:32] = 1.0  # bright top half: a vertical flip would make the bottom bright
    plain = Augment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotate=0.0, scale=(1.0, 1.0), shift=0.0,
                    contrast=(1.0, 1.0), brightness=0.0, gamma=(1.0, 1.0), p_lowres=0.0, p_blur=0.0,
                    p_jpeg=0.0, p_noise=0.0, p_border=0.0, p_flip=1.0)  # fmt: skip
    out = plain(gray, np.random.default_rng(0))
    assert out[:28].mean() > 0.95 and out[36:].mean() < 0.05


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


def test_positive_auroc_uses_the_positive_column() -> None:
    logits = np.array([[0.0, 3.0, 1.0], [0.0, 2.0, 0.5], [0.0, 0.0, 2.0], [0.0, 1.0, 3.0]])
    labels = np.array([0, 1, 2, 2])  # the positive label is the third class
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert positive_auroc(logits, labels, 2) == roc_auc_score(labels == 2, probs[:, 2]) == 1.0
    assert roc_auc_score(labels == 2, probs[:, 1]) == 0.0  # what column 1 would have said


def test_validation_auroc_follows_the_positive_label(samples: list[Sample], tmp_path: Path) -> None:
    """Three labels, the positive one last: the logged AUROC is of its column (column 1 raised)."""
    rows = ["path,label"] + [
        f"{s.path},{'normal' if s.label == 0 else ('pneumonia' if i % 2 else 'other')}"
        for i, s in enumerate(samples)
    ]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    labels = ("normal", "other", "pneumonia")
    data = list_samples(tmp_path / "data.csv", labels)
    assert sorted(s.label for s in data) == [0, 0, 1, 2]
    config = TrainConfig(
        labels=labels,
        positive_label="pneumonia",
        preprocessing=Preprocessing(input_size=64),
        epochs=1,
        head_epochs=0,
        batch_size=2,
        lr=1e-3,
        threads=2,
    )
    result = fit(config, data, data, tmp_path / "run")
    logits, classes = predict_logits(result.network, eval_loader(data, config), torch.device("cpu"))
    probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
    expected = roc_auc_score(classes == 2, probs[:, 2])
    assert result.history[0]["valid_auroc"] == pytest.approx(expected, abs=1e-12)


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
