"""``triage train``, ``triage evaluate`` and ``triage models list|show|import``.

The lead wires :func:`add_commands` into the ``triage`` console script; each sub-command
sets ``func``, called with the parsed arguments. ``python -m models.cli ...`` runs the same
commands stand-alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy imports (torch, timm, matplotlib) wait for the command that needs them
    import numpy as np

    from models.bundle import Bundle
    from models.train import Sample

DEFAULT_BUNDLES = Path(__file__).parent / "bundles"
LOCAL_BUNDLES = Path("var/models")
PARTS = ("train", "valid", "test")
PERTURBATION_NAMES = (
    "original",
    "resolution_112",
    "resolution_512",
    "jpeg_q20",
    "contrast_0.6",
    "gamma_0.6",
    "gamma_1.6",
    "dicom12_monochrome1",
)
"""The keys of :data:`models.evaluate.PERTURBATIONS` (kept here so ``--help`` loads no torch)."""


def _fractions(text: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError("give three fractions: train,valid,test")
    return values[0], values[1], values[2]


def _device_name(device: str, threads: int) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({os.cpu_count()} cores, {threads} threads)"


def _labelled(bundle: Bundle, samples: list[Sample]) -> tuple[np.ndarray, list[str]]:
    import numpy as np

    labels = np.asarray([int(s.label == bundle.card.positive_index) for s in samples])
    return labels, [s.subgroup for s in samples]


def run_train(args: argparse.Namespace) -> int:
    """Train, calibrate on validation, evaluate on held-out test patients, write the bundle.

    Args:
        args: the parsed ``train`` arguments.

    Returns:
        The process exit code.
    """
    import timm
    import torch

    from models.bundle import Bundle, Thresholds, load_bundle, save_bundle
    from models.calibrate import (
        calibrated_scores,
        fit_calibration,
        fold_bias,
        nll,
        operating_points,
        risk_histogram,
        shift_logits,
    )
    from models.evaluate import (
        auroc_ci,
        compact,
        evaluate_bundle,
        reliability,
        score_logits,
        summarize,
        write_report,
    )
    from models.preprocess import Preprocessing
    from models.train import TrainConfig, fit, list_samples, split_by_patient

    started = time.monotonic()
    labels = tuple(args.labels.split(","))
    template = json.loads(args.card_template.read_text()) if args.card_template else {}
    cfg = timm.models.get_pretrained_cfg(args.architecture)
    if cfg is None:
        raise ValueError(f"timm has no pretrained config (mean/std) for {args.architecture}")
    pre = Preprocessing(
        input_size=args.input_size, resize="stretch", mean=tuple(cfg.mean), std=tuple(cfg.std)
    )
    config = TrainConfig(
        architecture=args.architecture,
        labels=labels,
        preprocessing=pre,
        weights_file=args.weights_file,
        epochs=args.epochs,
        head_epochs=args.head_epochs,
        frozen_stages=args.frozen_stages,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
        max_train=args.max_train,
    )
    samples = list_samples(args.data, labels)
    train, valid, test = split_by_patient(samples, args.split, args.seed)
    result = fit(config, train, valid, args.run_dir, resume=args.resume)
    state = result.network.state_dict()

    fields: dict[str, Any] = {
        "name": args.name,
        "version": args.version,
        "architecture": args.architecture,
        "labels": labels,
        "positive_label": args.positive_label,
        "preprocessing": pre.model_dump(mode="json"),
        "thresholds": Thresholds(critical=0.5, elevated=0.5).model_dump(),
        **template,
    }
    save_bundle(args.out, fields, state)
    bundle = load_bundle(args.out, args.device)
    stored_bias = float(bundle.network.get_classifier().bias[bundle.card.positive_index])  # type: ignore[operator]

    # Calibration and thresholds from validation only, on the stored fp16 weights.
    positive = bundle.card.positive_index
    raw_logits = score_logits(bundle, valid, desc="valid")
    valid_labels, valid_groups = _labelled(bundle, valid)
    plain = fit_calibration(raw_logits, valid_labels, positive, fit_bias=False)
    calibration = fit_calibration(raw_logits, valid_labels, positive)
    fold_bias(result.network, positive, calibration.bias)
    state = result.network.state_dict()
    save_bundle(args.out, fields, state)
    bundle = load_bundle(args.out, args.device)
    # The exact shift the stored (fp16) classifier now applies.
    stored_shift = float(bundle.network.get_classifier().bias[positive] - stored_bias)  # type: ignore[operator]
    valid_logits = shift_logits(raw_logits, positive, stored_shift)
    temperature = calibration.temperature
    valid_scores = calibrated_scores(valid_logits, temperature, positive)
    points = operating_points(valid_scores, valid_labels)
    fields |= {"temperature": temperature, "thresholds": points.thresholds.model_dump()}
    bundle = Bundle(
        bundle.card.model_copy(update={"temperature": temperature, "thresholds": points.thresholds}),
        bundle.network,
        bundle.device,
    )
    validation = summarize(valid_labels, valid_scores, points.thresholds, valid_groups)
    tta_logits = score_logits(bundle, valid, tta=True, desc="valid-tta")
    tta_auroc, tta_low, tta_high = auroc_ci(
        valid_labels, calibrated_scores(tta_logits, temperature, positive)
    )

    metrics: dict[str, Any] = {
        "validation": compact({"original": validation})["original"],
        "risk_histogram": risk_histogram(valid_scores),
        "calibration": {
            "method": "temperature + positive-logit bias (folded into the classifier), "
            "minimising validation NLL",
            "bias": stored_shift,
            "temperature": temperature,
            "nll_before": nll(raw_logits, valid_labels),
            "nll_temperature_only": nll(raw_logits, valid_labels, plain.temperature),
            "nll_after": nll(valid_logits, valid_labels, temperature),
            "ece_before": reliability(valid_labels, calibrated_scores(raw_logits, 1.0, positive))[0],
            "ece_temperature_only": reliability(
                valid_labels, calibrated_scores(raw_logits, plain.temperature, positive)
            )[0],
        },
        "tta_validation": {
            "views": "image + 90% centre zoom, mean logits",
            "auroc": tta_auroc,
            "auroc_ci95": [tta_low, tta_high],
        },
    }
    if test:
        tested = evaluate_bundle(bundle, test, perturbations=args.perturb)
        write_report(tested, args.run_dir / "report-test", bundle)
        metrics["heldout_test"] = compact(tested)
    fields["training"] = {
        "command": shlex.join(["python", "-m", "models.cli", *[a for a in sys.argv[1:] if a != "--resume"]]),
        "resumed": args.resume,
        "seed": args.seed,
        "device": _device_name(args.device, args.threads),
        "fit_wall_seconds": round(result.wall_seconds, 1),
        "calibrate_evaluate_wall_seconds": round(
            time.monotonic() - started - (0.0 if args.resume else result.wall_seconds), 1
        ),
        "epochs": args.epochs,
        "history": result.history,
        "peak_lr": result.lr,
        "lr_source": "--lr"
        if args.lr is not None
        else "LR finder: smoothed-loss minimum / 10, clipped to [1e-4, 2e-3]",
        "split": {
            "method": f"patient-wise, stratified by class, fractions {list(args.split)}, seed {args.seed}",
            **{
                part: {"images": len(s), "patients": len({x.patient for x in s})}
                for part, s in zip(PARTS, (train, valid, test), strict=True)
            },
        },
        "config": config.as_record(),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    fields["validation_metrics"] = metrics
    card = save_bundle(args.out, fields, state)
    print(
        json.dumps(
            {"bundle": str(args.out), "sha256": card.weights_sha256, **compact({"validation": validation})},
            indent=2,
        )
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a bundle on a labelled folder or CSV; write ``report.json`` and ``report.png``.

    Args:
        args: the parsed ``evaluate`` arguments.

    Returns:
        The process exit code.
    """
    from models.bundle import load_bundle
    from models.evaluate import compact, evaluate_bundle, write_report
    from models.train import list_samples, split_by_patient

    bundle = load_bundle(args.bundle, args.device)
    samples = list_samples(args.data, bundle.card.labels)
    if args.part != "all":
        samples = split_by_patient(samples, args.split, args.seed)[PARTS.index(args.part)]
    results = evaluate_bundle(bundle, samples, perturbations=args.perturb, tta=args.tta)
    json_path, png_path = write_report(results, args.out, bundle)
    print(json.dumps(compact(results), indent=2))
    print(f"wrote {json_path} and {png_path}")
    return 0


def bundle_dirs(folders: list[Path]) -> list[Path]:
    """Sub-folders of ``folders`` that hold a ``card.json`` (sorted, missing folders skipped)."""
    return sorted(
        p for folder in folders if folder.is_dir() for p in folder.iterdir() if (p / "card.json").is_file()
    )


def run_models_list(args: argparse.Namespace) -> int:
    """Print one line per bundle: ``name@version``, verified or the reason it is refused."""
    from models.bundle import BundleError, verify_bundle

    for path in bundle_dirs(args.dir or [DEFAULT_BUNDLES, LOCAL_BUNDLES]):
        try:
            card = verify_bundle(path)
            print(f"{card.ref}\t{card.architecture}\tok\t{path}")
        except BundleError as exc:
            print(f"?\t?\trefused: {exc}\t{path}")
    return 0


def run_models_show(args: argparse.Namespace) -> int:
    """Print a verified bundle's card as JSON."""
    from models.bundle import verify_bundle

    print(json.dumps(verify_bundle(args.path).model_dump(mode="json"), indent=2))
    return 0


def run_models_import(args: argparse.Namespace) -> int:
    """Verify a bundle and copy it to ``<dest>/<name>-<version>/``; an existing copy is refused.

    Raises:
        BundleError: if the source does not verify or the destination exists.
    """
    from models.bundle import BundleError, verify_bundle

    card = verify_bundle(args.src)
    target = args.dest / f"{card.name}-{card.version}"
    if target.exists():
        raise BundleError(f"{target} already exists")
    shutil.copytree(args.src, target)
    verify_bundle(target)
    print(f"imported {card.ref} into {target}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``train``, ``evaluate`` and ``models list|show|import``.

    Args:
        subparsers: the result of ``parser.add_subparsers()`` of the ``triage`` command.
    """
    train = subparsers.add_parser("train", help="fine-tune a pretrained network and write a bundle")
    train.add_argument("--data", type=Path, required=True, help="folder LABEL/* or CSV path,label")
    train.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    train.add_argument("--run-dir", type=Path, default=Path("runs/train"), help="checkpoints and reports")
    train.add_argument("--name", required=True)
    train.add_argument("--version", required=True)
    train.add_argument("--labels", default="normal,pneumonia", help="comma-separated, class-index order")
    train.add_argument("--positive-label", default="pneumonia")
    train.add_argument(
        "--card-template", type=Path, help="JSON with intended_use, data_provenance, limitations"
    )
    train.add_argument("--architecture", default="tf_efficientnet_lite0")
    train.add_argument("--weights-file", type=Path, help="local pretrained weights (timm names)")
    train.add_argument("--input-size", type=int, default=224)
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--head-epochs", type=int, default=1, help="epochs training only the new head")
    train.add_argument("--frozen-stages", type=int, default=4, help="stem + this many stages stay frozen")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, help="peak head learning rate (default: LR finder)")
    train.add_argument(
        "--split", type=_fractions, default=(0.7, 0.15, 0.15), help="train,valid,test fractions"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-train", type=int, help="subsample the training part")
    train.add_argument("--workers", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--device", default="cpu")
    train.add_argument(
        "--perturb", nargs="*", default=list(PERTURBATION_NAMES), choices=list(PERTURBATION_NAMES)
    )
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser("evaluate", help="measure a bundle on labelled images")
    evaluate.add_argument("--bundle", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True, help="folder LABEL/* (.jpeg/.png/.dcm) or CSV")
    evaluate.add_argument("--out", type=Path, default=Path("runs/evaluate"))
    evaluate.add_argument("--part", choices=[*PARTS, "all"], default="all", help="patient-wise part to use")
    evaluate.add_argument("--split", type=_fractions, default=(0.7, 0.15, 0.15))
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--perturb", nargs="*", default=["original"], choices=list(PERTURBATION_NAMES))
    evaluate.add_argument("--tta", action="store_true")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=run_evaluate)

    models = subparsers.add_parser("models", help="model bundles")
    sub = models.add_subparsers(dest="models_command", required=True)
    listing = sub.add_parser("list", help="list bundles")
    listing.add_argument("--dir", type=Path, action="append", help="folder of bundles (repeatable)")
    listing.set_defaults(func=run_models_list)
    show = sub.add_parser("show", help="print a bundle's card")
    show.add_argument("path", type=Path)
    show.set_defaults(func=run_models_show)
    importing = sub.add_parser("import", help="verify and copy a bundle into var/models")
    importing.add_argument("src", type=Path)
    importing.add_argument("--dest", type=Path, default=LOCAL_BUNDLES)
    importing.set_defaults(func=run_models_import)


def main(argv: list[str] | None = None) -> int:
    """Run one command stand-alone (``python -m models.cli``)."""
    parser = argparse.ArgumentParser(prog="python -m models.cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
