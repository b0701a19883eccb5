"""The ablation behind docs/model.md: each choice's effect on the hard validation split.

    python -m models.ablation --run-dir RUN_DIR --out ablation.json \
        --old-bundle models/bundles/cxr-pneumonia-lite0

Reads the members trained by ``triage train`` (``RUN_DIR/member-N/last.pt``: the weight
average and the last weights), scores the patient-wise and hard validation images once per
network (and their mirror images), and compares, with bootstrap 95 % intervals:

- last weights vs the exponential moving average; one member vs ensembles of the first k members;
  horizontal-flip test-time augmentation;
- calibration fitted on the patient-wise split vs on the hard split, at the hard split's
  prevalence vs class-balanced. ECE here is *cross-fitted*: calibration fitted on one half
  of the hard split's patients and measured on the other half, both ways, so it is not the
  in-sample figure of the card;
- the previous default bundle, on the only fair ground: hard-split images whose patients
  it did not train on (its own validation and test patients).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from tqdm import tqdm

from models.bundle import Bundle, create_network, load_bundle
from models.calibrate import calibrated_scores, fit_calibration, shift_logits
from models.data import Sample, list_samples, load_gray, split_by_patient, validation_splits
from models.evaluate import auroc_ci
from models.inference import prepare
from models.metrics import reliability
from models.pipeline import balanced_subset
from models.preprocess import Preprocessing, to_input


def member_networks(run_dir: Path, labels: int, input_size: int) -> dict[str, torch.nn.Module]:
    """``{"A": EMA, "A last": last weights, "B": EMA, ...}`` from each member's ``last.pt``."""
    networks: dict[str, torch.nn.Module] = {}
    for index, folder in enumerate(sorted(run_dir.glob("member-*"))):
        name = chr(ord("A") + index)
        state = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
        weights = {"": state["network"]}
        if state.get("average") is not None:
            average = {k.removeprefix("module."): v for k, v in state["average"].items() if k != "n_averaged"}
            weights = {"": average, " last": state["network"]}
        for suffix, tensors in weights.items():
            network = create_network(state.get("architecture", "tf_efficientnet_lite0"), labels)
            network.load_state_dict(tensors)
            network.eval().to(memory_format=torch.channels_last)
            networks[name + suffix] = prepare(network, input_size)
    return networks


@torch.inference_mode()
def score(
    networks: dict[str, torch.nn.Module],
    samples: Sequence[Sample],
    pre: Preprocessing,
    mirrored: Sequence[str] = (),
    batch: int = 32,
) -> dict[str, np.ndarray]:
    """Logits ``(N, 2)`` of every network, and of the ``mirrored`` ones on mirrored images.

    The mirrored images' logits are under ``name + " flip"``.
    """
    out: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(samples), batch), desc="score", leave=False):
        inputs = torch.from_numpy(
            np.stack([to_input(load_gray(s.path, pre), pre) for s in samples[start : start + batch]])
        ).contiguous(memory_format=torch.channels_last)
        for name, network in networks.items():
            out.setdefault(name, []).append(network(inputs).double().numpy())
            if name in mirrored:
                out.setdefault(name + " flip", []).append(network(inputs.flip(-1)).double().numpy())
    return {name: np.concatenate(parts) for name, parts in out.items()}


def cross_fitted(
    logits: np.ndarray, labels: np.ndarray, patients: Sequence[str], balanced: bool
) -> np.ndarray:
    """Calibrated scores where each half of the patients is calibrated on the other half."""
    halves = np.asarray([hash_half(p) for p in patients])
    scores = np.zeros(len(labels))
    for half in (0, 1):
        fit = fit_calibration(logits[halves != half], labels[halves != half], 1, balanced=balanced)
        shifted = shift_logits(logits[halves == half], 1, fit.bias)
        scores[halves == half] = calibrated_scores(shifted, fit.temperature, 1)
    return scores


def hash_half(patient: str) -> int:
    """A stable 0/1 split of patients (the sum of the name's bytes, odd or even)."""
    return sum(patient.encode()) % 2


def figures(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """AUROC with its interval, ECE (as given and on a 1:1 subset), mean risk of a normal."""
    auroc, low, high = auroc_ci(labels, scores)
    subset = balanced_subset(labels)
    return {
        "auroc": auroc,
        "auroc_ci95": [low, high],
        "ece": reliability(labels, scores)[0],
        "ece_balanced": reliability(labels[subset], scores[subset])[0],
        "mean_risk_normal": float(scores[labels == 0].mean()),
    }


def bundle_logits(bundle: Bundle, samples: Sequence[Sample], batch: int = 32) -> np.ndarray:
    """A bundle's logits ``(N, 2)`` on ``samples``, through its own preprocessing."""
    pre = bundle.card.preprocessing
    parts = []
    for start in range(0, len(samples), batch):
        images = np.stack([to_input(load_gray(s.path, pre), pre) for s in samples[start : start + batch]])
        parts.append(bundle.logits(images).double().numpy())
    return np.concatenate(parts)


def run(
    data: Path,
    run_dir: Path,
    old: Bundle | None,
    seed: int = 0,
    same_split: dict[str, Bundle] | None = None,
) -> dict[str, Any]:
    """Every row of the ablation table (see the module docstring).

    ``same_split``: bundles trained on the same training part (earlier versions), scored and
    cross-fitted like the members, under their labels.
    """
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0")
    assert cfg is not None
    pre = Preprocessing(input_size=224, resize="stretch", mean=tuple(cfg.mean), std=tuple(cfg.std))
    samples = list_samples(data, ("normal", "pneumonia"))
    _, valid, hard = validation_splits(samples, 0.2, 0.15, seed)
    networks = member_networks(run_dir, 2, pre.input_size)
    members = [n for n in networks if " " not in n]
    logits = {
        "hard": score(networks, hard, pre, mirrored=members),
        "valid": score({m: networks[m] for m in members}, valid, pre, mirrored=members),
    }
    labels = {"hard": np.asarray([s.label for s in hard]), "valid": np.asarray([s.label for s in valid])}
    combos: dict[str, list[str]] = {name: [name] for name in networks}
    combos |= {f"{m} + hflip TTA": [m, m + " flip"] for m in members}
    for k in range(2, len(members) + 1):
        combos[f"{' + '.join(members[:k])} ensemble"] = members[:k]
    if len(members) > 1:
        combos[f"{' + '.join(members)} ensemble + hflip TTA"] = members + [m + " flip" for m in members]
    for label, bundle in (same_split or {}).items():
        logits["hard"][label] = bundle_logits(bundle, hard)
        logits["valid"][label] = bundle_logits(bundle, valid)
        combos[label] = [label]
    old_unseen = {s.patient for part in split_by_patient(samples, (0.7, 0.15, 0.15), 0)[1:] for s in part}
    fair = np.asarray([s.patient in old_unseen for s in hard])
    rows: dict[str, Any] = {}
    for name, parts in combos.items():
        hard_logits = np.mean([logits["hard"][p] for p in parts], axis=0)
        valid_logits = (
            np.mean([logits["valid"][p] for p in parts], axis=0)
            if all(p in logits["valid"] for p in parts)
            else None
        )
        crossed = cross_fitted(hard_logits, labels["hard"], [s.patient for s in hard], balanced=True)
        rows[name] = {
            "forward_passes_per_image": len(parts),
            "hard": figures(labels["hard"], crossed),
            "hard_old_unseen": figures(labels["hard"][fair], crossed[fair]),
            "patient_valid_auroc": auroc_ci(labels["valid"], calibrated_scores(valid_logits, 1.0, 1))
            if valid_logits is not None
            else None,
        }
    patients = [s.patient for s in hard]
    calibration: dict[str, dict[str, Any]] = {}
    for variant, chosen in {
        "plain": members,
        "hflip TTA": [*members, *(m + " flip" for m in members)],
    }.items():
        hard_logits = np.mean([logits["hard"][m] for m in chosen], axis=0)
        on_valid = fit_calibration(np.mean([logits["valid"][m] for m in chosen], axis=0), labels["valid"], 1)
        rows_of = {
            "uncalibrated": calibrated_scores(hard_logits, 1.0, 1),
            "fitted on patient validation": calibrated_scores(
                shift_logits(hard_logits, 1, on_valid.bias), on_valid.temperature, 1
            ),
            "cross-fitted on hard, hard prevalence": cross_fitted(
                hard_logits, labels["hard"], patients, False
            ),
            "cross-fitted on hard, class-balanced": cross_fitted(hard_logits, labels["hard"], patients, True),
        }
        calibration[variant] = {k: figures(labels["hard"], v) for k, v in rows_of.items()}
    result: dict[str, Any] = {
        "images": {"hard": len(hard), "patient_valid": len(valid), "hard_old_unseen": int(fair.sum())},
        "models": rows,
        "calibration": calibration,
    }
    if old is not None:
        picked = [s for s, f in zip(hard, fair, strict=True) if f]
        old_scores = calibrated_scores(bundle_logits(old, picked), old.card.temperature, 1)
        result["previous_default_on_hard_old_unseen"] = {
            "bundle": old.card.ref,
            "as_shipped": figures(labels["hard"][fair], old_scores),
        }
    return result


def border_share(cam: np.ndarray, band: float = 0.125) -> float:
    """Share of a Grad-CAM's mass in the outer ``band`` of the image on every side.

    The lungs of a frontal radiograph fill the centre; a map whose mass sits in the border
    band (44 % of the area at 0.125) looks at edges, labels and collimation, not at lungs.
    """
    total = float(cam.sum())
    if total <= 0:
        return 0.0
    h, w = cam.shape
    dh, dw = round(h * band), round(w * band)
    return 1.0 - float(cam[dh : h - dh, dw : w - dw].sum()) / total


def attention_audit(bundle: Bundle, data: Path, worst: int = 16, seed: int = 0) -> dict[str, Any]:
    """Where the bundle looks on the hard split's worst errors, against correct cases.

    Scores the hard split, takes the ``worst`` highest-scored normals and lowest-scored
    pneumonias, and as many confidently correct cases of each class, and reports the mean
    :func:`border_share` of their Grad-CAMs (a uniform map has 0.44).
    """
    from models.explain import gradcam

    pre = bundle.card.preprocessing
    samples = list_samples(data, bundle.card.labels)
    _, _, hard = validation_splits(samples, 0.2, 0.15, seed)
    positive = bundle.card.positive_index
    scores = calibrated_scores(bundle_logits(bundle, hard), bundle.card.temperature, positive)
    labels = np.asarray([s.label == positive for s in hard])
    order = np.argsort(scores)
    normals, pneumonias = order[~labels[order]], order[labels[order]]
    groups = {
        "false positives (highest-scored normals)": normals[::-1][:worst],
        "false negatives (lowest-scored pneumonias)": pneumonias[:worst],
        "correct normals (lowest-scored)": normals[:worst],
        "correct pneumonias (highest-scored)": pneumonias[::-1][:worst],
    }
    result: dict[str, Any] = {"band": 0.125, "uniform_share": 1 - 0.75**2}
    for name, picked in groups.items():
        shares = [border_share(gradcam(bundle, to_input(load_gray(hard[i].path, pre), pre))) for i in picked]
        result[name] = {
            "images": len(picked),
            "scores": [round(float(scores[i]), 3) for i in picked],
            "border_share_mean": float(np.mean(shares)),
            "border_share_max": float(np.max(shares)),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the ablation and write its JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cxr-pneumonia/train"))
    parser.add_argument("--run-dir", type=Path, help="the members trained by triage train")
    parser.add_argument("--old-bundle", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--same-split-bundle",
        type=Path,
        action="append",
        default=[],
        help="a bundle trained on the same training part, compared on the whole splits",
    )
    parser.add_argument(
        "--gradcam",
        type=Path,
        help="a bundle: only the Grad-CAM audit of its worst hard-split errors (attention_audit)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--tta", action="store_true", help="calibration rows with hflip test-time augmentation"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.gradcam:
        audit = attention_audit(load_bundle(args.gradcam, rewrite=False), args.data)
        args.out.write_text(json.dumps(audit, indent=2) + "\n")
        print(json.dumps(audit, indent=2))
        return 0
    if args.run_dir is None:
        parser.error("--run-dir is required (or --gradcam BUNDLE)")
    old = load_bundle(args.old_bundle) if args.old_bundle else None
    same = {}
    for path in args.same_split_bundle:
        bundle = load_bundle(path)
        same[f"{bundle.card.ref} as shipped"] = bundle
    result = run(args.data, args.run_dir, old, same_split=same)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
