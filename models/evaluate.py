"""Measure a bundle: discrimination, operating points, calibration, subgroups, robustness.

Scores come from the bundle exactly as the service computes them (same preprocessing,
same fp16-stored weights, ``softmax(logits / T)``). Robustness is checked on perturbed
copies of the same images (:data:`models.data.PERTURBATIONS`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from models.bundle import Bundle, Thresholds
from models.calibrate import calibrated_scores
from models.data import PERTURBATIONS, Perturbation, Sample, center_crop, load_gray
from models.metrics import bootstrap_aurocs, reliability
from models.preprocess import to_input


def auroc_ci(
    labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC with a percentile bootstrap confidence interval (resampling images).

    Args:
        labels: 1 for positive, 0 for negative.
        scores: higher means more likely positive.
        n_boot: bootstrap resamples (those with a single class are skipped).
        level: confidence level of the interval.
        seed: resampling seed.

    Returns:
        ``(auroc, low, high)``.

    Raises:
        ValueError: if ``labels`` does not contain both classes.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    if len(np.unique(labels)) != 2:
        raise ValueError("AUROC needs both classes")
    point = float(roc_auc_score(labels, scores))
    boots = bootstrap_aurocs(labels, scores, n_boot, seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(boots, [tail, 1.0 - tail])
    return point, float(low), float(high)


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Confusion matrix and rates when ``score >= threshold`` counts as positive.

    Returns:
        ``tp, fp, tn, fn, sensitivity, specificity, ppv, npv, accuracy`` (NaN where undefined).
    """
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    tn = int(np.sum(~predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "accuracy": ratio(tp + tn, len(labels)),
    }


def summarize(
    labels: np.ndarray, scores: np.ndarray, thresholds: Thresholds, subgroups: Sequence[str] | None = None
) -> dict[str, Any]:
    """All metrics for one set of calibrated scores.

    Args:
        labels: 1 for positive, 0 for negative.
        scores: calibrated positive-class probabilities.
        thresholds: the bundle's tier thresholds.
        subgroups: per-image subgroup names (e.g. ``bacteria``/``virus``/``normal``); each
            positive subgroup is reported against all negatives.

    Returns:
        A JSON-ready dict (``auroc``, ``auroc_ci95``, ``ece``, per-threshold rates, subgroups).
    """
    auroc, low, high = auroc_ci(labels, scores)
    ece, bins = reliability(labels, scores)
    result: dict[str, Any] = {
        "n": int(len(labels)),
        "positives": int(labels.sum()),
        "auroc": auroc,
        "auroc_ci95": [low, high],
        "ece": ece,
        "reliability": bins,
        "critical": at_threshold(labels, scores, thresholds.critical),
        "elevated": at_threshold(labels, scores, thresholds.elevated),
    }
    if subgroups is not None:
        names = np.asarray(subgroups)
        groups: dict[str, Any] = {}
        for name in sorted(set(names[labels == 1])):
            mask = (labels == 0) | (names == name)
            g_auroc, g_low, g_high = auroc_ci(labels[mask], scores[mask])
            groups[name] = {
                "n_positive": int(np.sum(names == name)),
                "auroc_vs_negatives": g_auroc,
                "auroc_ci95": [g_low, g_high],
                "critical_sensitivity": at_threshold(
                    labels[names == name], scores[names == name], thresholds.critical
                )["sensitivity"],
            }
        result["subgroups"] = groups
    return result


def score_logits(
    bundle: Bundle,
    samples: Sequence[Sample],
    perturbation: Perturbation = PERTURBATIONS["original"],
    tta: bool = False,
    batch_size: int = 32,
    desc: str = "score",
) -> np.ndarray:
    """Bundle logits for samples, after an optional perturbation of each grey image.

    Args:
        bundle: the loaded bundle (its network is switched to channels_last, faster on CPU).
        samples: the images.
        perturbation: applied to the ``[0, 1]`` grey image before :func:`to_input`.
        tta: also average logits over a 90 % centre zoom of each image (on top of the
            bundle's own test-time augmentation, if its card has one).
        batch_size: images per forward pass.
        desc: progress-bar label.

    Returns:
        ``(N, C)`` logits (divide by the card's temperature for calibrated scores).
    """
    pre = bundle.card.preprocessing
    bundle.network.to(memory_format=torch.channels_last)
    outputs = []
    for start in tqdm(range(0, len(samples), batch_size), desc=desc, leave=False):
        grays = [perturbation(load_gray(s.path, pre), pre) for s in samples[start : start + batch_size]]
        views = [np.stack([to_input(g, pre) for g in grays])]
        if tta:
            views.append(np.stack([to_input(center_crop(g, 0.9), pre) for g in grays]))
        outputs.append(np.mean([bundle.logits(v).double().numpy() for v in views], axis=0))
    return np.concatenate(outputs)


def evaluate_bundle(
    bundle: Bundle, samples: Sequence[Sample], perturbations: Sequence[str] = ("original",), tta: bool = False
) -> dict[str, Any]:
    """Metrics of a bundle on samples, for each named perturbation.

    Args:
        bundle: the loaded bundle.
        samples: labelled images (label index 1 must be the bundle's positive label).
        perturbations: keys of :data:`PERTURBATIONS`.
        tta: test-time augmentation (see :func:`score_logits`).

    Returns:
        ``{perturbation: summary}`` (see :func:`summarize`); the ``original`` entry also
        carries ``scores``, ``labels`` and ``paths`` for the report.

    Raises:
        KeyError: for an unknown perturbation name.
    """
    labels = np.asarray([int(s.label == bundle.card.positive_index) for s in samples])
    subgroups = [s.subgroup for s in samples]
    results: dict[str, Any] = {}
    for name in perturbations:
        logits = score_logits(bundle, samples, PERTURBATIONS[name], tta=tta, desc=name)
        scores = calibrated_scores(logits, bundle.card.temperature, bundle.card.positive_index)
        results[name] = summarize(labels, scores, bundle.card.thresholds, subgroups)
        if name == "original":
            results[name] |= {
                "scores": scores.tolist(),
                "labels": labels.tolist(),
                "paths": [str(s.path) for s in samples],
            }
    return results


def compact(results: dict[str, Any]) -> dict[str, Any]:
    """Results without per-image lists and reliability bins (for the model card)."""
    drop = {"scores", "labels", "paths", "reliability"}
    return {name: {k: v for k, v in summary.items() if k not in drop} for name, summary in results.items()}


def write_report(results: dict[str, Any], out_dir: Path, bundle: Bundle, worst: int = 8) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.png`` (ROC, reliability, confusion, worst errors).

    Args:
        results: the output of :func:`evaluate_bundle` (needs its ``original`` entry).
        out_dir: where to write.
        bundle: the bundle evaluated (preprocessing for the error thumbnails).
        worst: how many worst errors of each kind to show.

    Returns:
        The JSON and PNG paths.

    Raises:
        KeyError: if ``results`` has no ``original`` entry.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    base = results["original"]
    labels, scores, paths = np.asarray(base["labels"]), np.asarray(base["scores"]), base["paths"]
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")

    false_pos = [i for i in np.argsort(-scores) if labels[i] == 0][:worst]
    false_neg = [i for i in np.argsort(scores) if labels[i] == 1][:worst]
    fig = Figure(figsize=(16, 12))
    grid = fig.add_gridspec(4, max(worst, 6))
    roc = fig.add_subplot(grid[:2, :2])
    fpr, tpr, _ = roc_curve(labels, scores)
    roc.plot(fpr, tpr)
    roc.plot([0, 1], [0, 1], "k:")
    low, high = base["auroc_ci95"]
    roc.set(
        title=f"ROC  AUROC {base['auroc']:.3f} [{low:.3f}, {high:.3f}]",
        xlabel="1 - specificity",
        ylabel="sensitivity",
    )
    rel = fig.add_subplot(grid[:2, 2:4])
    filled = [b for b in base["reliability"] if b["count"]]
    rel.plot([0, 1], [0, 1], "k:")
    rel.plot([b["confidence"] for b in filled], [b["frequency"] for b in filled], "o-")
    rel.set(
        title=f"Reliability  ECE {base['ece']:.3f}",
        xlabel="predicted probability",
        ylabel="observed frequency",
    )
    conf = fig.add_subplot(grid[:2, 4:6])
    crit = base["critical"]
    conf.imshow([[crit["tn"], crit["fp"]], [crit["fn"], crit["tp"]]], cmap="Blues")
    for (r, c), key in {(0, 0): "tn", (0, 1): "fp", (1, 0): "fn", (1, 1): "tp"}.items():
        conf.text(c, r, f"{key}\n{crit[key]}", ha="center", va="center")
    conf.set(
        title=f"critical >= {crit['threshold']:.3f}",
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["pred neg", "pred pos"],
        yticklabels=["neg", "pos"],
    )
    pre = bundle.card.preprocessing
    for row, (indices, kind) in enumerate(
        ((false_pos, "negative, high score"), (false_neg, "positive, low score"))
    ):
        for col, i in enumerate(indices):
            ax = fig.add_subplot(grid[2 + row, col])
            ax.imshow(load_gray(Path(paths[i]), pre), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{kind}\n{Path(paths[i]).name[:22]}\np={scores[i]:.3f}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    png_path = out_dir / "report.png"
    fig.savefig(png_path, dpi=80)
    return json_path, png_path
