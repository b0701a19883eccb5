"""From labelled images to a verified bundle: train -> calibrate -> thresholds -> card.

:func:`build_bundle` is the whole recipe; ``triage train`` (:mod:`models.cli`) only parses
arguments into it. Images are split three ways (:func:`models.data.validation_splits`):
training patients, a random patient-wise validation set, and the *hard* validation set
of held-out acquisition batches. Everything that is fitted after training (temperature,
the prior bias, tier thresholds) is fitted on the hard set, the one that resembles a new
site; both validation sets are reported side by side, with bootstrap 95 % intervals, and
the hard set again under every perturbation of :data:`models.data.PERTURBATIONS`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch

from models.bundle import Bundle, ModelCard, Thresholds, load_bundle, networks_of, save_bundle
from models.calibrate import (
    calibrated_scores,
    fit_calibration,
    fold_bias,
    nll,
    operating_points,
    risk_histogram,
    shift_logits,
)
from models.data import PERTURBATIONS, Sample, list_samples, validation_splits
from models.evaluate import compact, evaluate_bundle, score_logits, summarize
from models.metrics import reliability
from models.train import TrainConfig, TrainResult, fit


@dataclass
class BuildConfig:
    """Everything :func:`build_bundle` needs besides the member networks' own settings."""

    data: Path
    out: Path
    run_dir: Path
    name: str
    version: str
    members: Sequence[TrainConfig]
    """One training run per ensemble member; all share the first one's labels and preprocessing."""
    card: dict[str, Any] = field(default_factory=dict)
    """Card fields written as given (intended_use, data_provenance, limitations)."""
    tta: Literal["none", "hflip"] = "none"
    hard_fraction: float = 0.2
    valid_fraction: float = 0.15
    split_seed: int = 0
    perturbations: Sequence[str] = tuple(PERTURBATIONS)
    perturbation_images: int = 300
    """Hard-validation images (stratified draw, seeded) scored under every perturbation."""
    resume: bool = False
    device: str = "cpu"
    command: str = ""
    """The command line that ran the build, recorded in the card."""


def binary_labels(samples: Sequence[Sample], positive_index: int) -> np.ndarray:
    """1 where a sample has the positive label, else 0."""
    return np.asarray([int(s.label == positive_index) for s in samples])


def balanced_subset(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Indices of every negative and as many randomly drawn positives (or the reverse).

    Calibration measured at a 1:1 prevalence next to the archive's 74 %: a site's
    prevalence differs, and ECE moves with it.
    """
    rng = np.random.default_rng(seed)
    positives, negatives = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    size = min(len(positives), len(negatives))
    picked = np.concatenate(
        [rng.choice(positives, size, replace=False), rng.choice(negatives, size, replace=False)]
    )
    return np.sort(picked)


def stratified_draw(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """``count`` samples drawn without replacement, each label in its share (all if fewer)."""
    if count >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    drawn: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        group = [s for s in samples if s.label == label]
        take = max(1, round(count * len(group) / len(samples)))
        drawn += [group[i] for i in sorted(rng.choice(len(group), min(take, len(group)), replace=False))]
    return sorted(drawn, key=lambda s: str(s.path))


def describe(
    labels: np.ndarray, scores: np.ndarray, thresholds: Thresholds, groups: list[str]
) -> dict[str, Any]:
    """:func:`models.evaluate.summarize` without per-bin tables, plus what a new site feels.

    Adds ``mean_risk_normal`` (the unseen images' 0.41 was the issue's first symptom) and
    ``ece_balanced`` (ECE on every negative and as many positives).
    """
    summary: dict[str, Any] = compact({"s": summarize(labels, scores, thresholds, groups)})["s"]
    subset = balanced_subset(labels)
    summary["mean_risk_normal"] = float(scores[labels == 0].mean())
    summary["ece_balanced"] = reliability(labels[subset], scores[subset])[0]
    return summary


def _split_record(parts: dict[str, Sequence[Sample]]) -> dict[str, Any]:
    return {
        name: {
            "images": len(part),
            "patients": len({s.patient for s in part}),
            "positives": int(sum(s.label for s in part)),
        }
        for name, part in parts.items()
    }


def build_bundle(config: BuildConfig) -> ModelCard:
    """Train every member, calibrate and set thresholds on the hard split, write the bundle.

    Args:
        config: data, output, members and the split.

    Returns:
        The card written to ``config.out`` (the bundle verifies and loads).

    Raises:
        ValueError: for members that disagree on labels or preprocessing, or unknown
            perturbation names.
    """
    started = time.monotonic()
    first = config.members[0]
    if any(
        (m.labels, m.positive_label, m.preprocessing)
        != (first.labels, first.positive_label, first.preprocessing)
        for m in config.members
    ):
        raise ValueError("ensemble members must share labels, positive label and preprocessing")
    unknown = set(config.perturbations) - set(PERTURBATIONS)
    if unknown:
        raise ValueError(f"unknown perturbations: {sorted(unknown)}")
    samples = list_samples(config.data, first.labels)
    train, valid, hard = validation_splits(
        samples, config.hard_fraction, config.valid_fraction, config.split_seed
    )
    results: list[TrainResult] = [
        fit(member, train, hard, config.run_dir / f"member-{i}", resume=config.resume)
        for i, member in enumerate(config.members)
    ]
    fit_seconds = sum(r.wall_seconds for r in results)

    fields: dict[str, Any] = {
        "name": config.name,
        "version": config.version,
        "architecture": first.architecture,
        "labels": first.labels,
        "positive_label": first.positive_label,
        "preprocessing": first.preprocessing.model_dump(mode="json"),
        "thresholds": Thresholds(critical=0.5, elevated=0.5).model_dump(),
        "tta": config.tta,
        **config.card,
    }
    networks = [r.network for r in results]
    kinds = [m.architecture for m in config.members]
    save_bundle(config.out, fields, [n.state_dict() for n in networks], architectures=kinds)
    bundle = load_bundle(config.out, config.device)
    positive = bundle.card.positive_index
    stored_bias = _positive_bias(bundle)

    # Temperature and prior bias from the hard split only, on the stored fp16 weights; the
    # classes are weighted equally, so the probabilities are for a 1:1 prior (a site's
    # prevalence is unknown and lower than the archive's).
    hard_labels, valid_labels = binary_labels(hard, positive), binary_labels(valid, positive)
    raw_hard = score_logits(bundle, hard, desc="hard")
    raw_valid = score_logits(bundle, valid, desc="valid")
    hard_classes = np.asarray([s.label for s in hard])
    calibration = fit_calibration(raw_hard, hard_classes, positive, balanced=True)
    plain = fit_calibration(raw_hard, hard_classes, positive, fit_bias=False)
    on_valid = fit_calibration(raw_valid, np.asarray([s.label for s in valid]), positive)
    for network in networks:
        fold_bias(network, positive, calibration.bias)
    save_bundle(config.out, fields, [n.state_dict() for n in networks], architectures=kinds)
    bundle = load_bundle(config.out, config.device)
    shift = _positive_bias(bundle) - stored_bias  # what the fp16 classifier now applies
    temperature = calibration.temperature
    hard_scores = calibrated_scores(shift_logits(raw_hard, positive, shift), temperature, positive)
    valid_scores = calibrated_scores(shift_logits(raw_valid, positive, shift), temperature, positive)
    points = operating_points(hard_scores, hard_labels, population="the hard validation split")
    bundle = Bundle(
        bundle.card.model_copy(update={"temperature": temperature, "thresholds": points.thresholds}),
        bundle.network,
        bundle.device,
    )
    hard_groups, valid_groups = [s.subgroup for s in hard], [s.subgroup for s in valid]
    robust_set = stratified_draw(hard, config.perturbation_images, config.split_seed)
    robustness = evaluate_bundle(bundle, robust_set, perturbations=config.perturbations)
    metrics: dict[str, Any] = {
        "how_measured": (
            "No test set exists here: every figure is measured on images of the training archive "
            "that training never saw. 'patient_validation': random held-out patients (optimistic: "
            "the same acquisition batches as training). 'hard_validation': the earliest-numbered "
            "patients of every acquisition series (models.data.split_by_acquisition), never a "
            "neighbour of a training batch; temperature, prior bias and thresholds are fitted on "
            "it, so its ECE and operating points are in-sample. 95 % intervals: bootstrap over "
            "images (1000 resamples). Unseen sites will score lower."
        ),
        "patient_validation": describe(valid_labels, valid_scores, points.thresholds, valid_groups),
        "hard_validation": describe(hard_labels, hard_scores, points.thresholds, hard_groups),
        "hard_validation_perturbed_images": len(robust_set),
        "hard_validation_perturbed": {
            name: {
                "auroc": r["auroc"],
                "auroc_ci95": r["auroc_ci95"],
                "ece": r["ece"],
                "critical_specificity": r["critical"]["specificity"],
                "critical_sensitivity": r["critical"]["sensitivity"],
            }
            for name, r in robustness.items()
        },
        "risk_histogram": risk_histogram(hard_scores),
        "calibration": {
            "method": "temperature + positive-logit bias (folded into every member's classifier), "
            "minimising the class-balanced NLL of the hard validation split",
            "bias": shift,
            "temperature": temperature,
            "hard_nll_before": nll(raw_hard, hard_classes),
            "hard_nll_after": nll(shift_logits(raw_hard, positive, shift), hard_classes, temperature),
            "hard_ece_uncalibrated": reliability(hard_labels, calibrated_scores(raw_hard, 1.0, positive))[0],
            "hard_ece_temperature_only": reliability(
                hard_labels, calibrated_scores(raw_hard, plain.temperature, positive)
            )[0],
            "hard_ece_if_fitted_on_patient_validation": reliability(
                hard_labels,
                calibrated_scores(
                    shift_logits(raw_hard, positive, on_valid.bias), on_valid.temperature, positive
                ),
            )[0],
        },
    }
    fields |= {"temperature": temperature, "thresholds": points.thresholds.model_dump()}
    fields["training"] = {
        "command": config.command,
        "resumed": config.resume,
        "seed": first.seed,
        "member_seeds": [m.seed for m in config.members],
        "device": _device_name(config.device, first.threads),
        "fit_wall_seconds": round(fit_seconds, 1),
        "calibrate_evaluate_wall_seconds": round(
            time.monotonic() - started - (0.0 if config.resume else fit_seconds), 1
        ),
        "members": [
            {"history": r.history, "peak_lr": r.lr, "config": m.as_record(), "train_images": r.train_count}
            for r, m in zip(results, config.members, strict=True)
        ],
        "split": {
            "method": (
                f"hard: the earliest {config.hard_fraction:.0%} of every acquisition series held out; "
                f"then patient-wise, stratified by class, {config.valid_fraction:.0%} validation, "
                f"seed {config.split_seed}"
            ),
            **_split_record({"train": train, "patient_validation": valid, "hard_validation": hard}),
        },
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    fields["validation_metrics"] = metrics
    return save_bundle(config.out, fields, [n.state_dict() for n in networks], architectures=kinds)


def _positive_bias(bundle: Bundle) -> float:
    """The positive output's classifier bias, averaged over the members (their logits are)."""
    positive = bundle.card.positive_index
    return float(
        np.mean([float(n.get_classifier().bias.detach()[positive]) for n in networks_of(bundle.network)])  # type: ignore[operator]
    )


def _device_name(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {threads} threads)"
