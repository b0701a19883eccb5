"""``triage train``, ``triage evaluate`` and ``triage models list|show|import``.

The lead wires :func:`add_commands` into the ``triage`` console script; each sub-command
sets ``func``, called with the parsed arguments. ``python -m models.cli ...`` runs the same
commands stand-alone.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

DEFAULT_BUNDLES = Path(__file__).parent / "bundles"
LOCAL_BUNDLES = Path("var/models")
PARTS = ("train", "valid", "hard")
"""The parts of :func:`models.data.validation_splits`: training, patient-wise and hard validation."""
PERTURBATION_NAMES = (
    "original",
    "resolution_112",
    "resolution_512",
    "jpeg_q20",
    "contrast_0.6",
    "gamma_0.6",
    "gamma_1.6",
    "window_narrow",
    "dicom12_monochrome1",
    "crop_0.85",
    "pad_0.08",
    "border_right_white",
    "border_left_black",
    "marker",
)
"""The keys of :data:`models.data.PERTURBATIONS` (kept here so ``--help`` loads no torch)."""


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError("give comma-separated integers") from exc


def run_train(args: argparse.Namespace) -> int:
    """Build a bundle with :func:`models.pipeline.build_bundle` from the parsed ``train`` arguments.

    One ensemble member per ``--seeds`` entry; ``--frozen-stages`` gives one value for all
    members or one per member.

    Returns:
        The process exit code.
    """
    import timm

    from models.pipeline import BuildConfig, build_bundle
    from models.preprocess import Preprocessing
    from models.train import TrainConfig

    labels = tuple(args.labels.split(","))
    kinds = args.architecture * len(args.seeds) if len(args.architecture) == 1 else args.architecture
    if len(kinds) != len(args.seeds):
        raise ValueError("give one --architecture, or one per seed")
    cfg = timm.models.get_pretrained_cfg(kinds[0])
    if cfg is None:
        raise ValueError(f"timm has no pretrained config (mean/std) for {kinds[0]}")
    for kind in kinds[1:]:
        other = timm.models.get_pretrained_cfg(kind)
        if other is None or (other.mean, other.std) != (cfg.mean, cfg.std):
            raise ValueError(f"{kind} normalises its input unlike {kinds[0]}: not one ensemble")
    pre = Preprocessing(
        input_size=args.input_size, resize="stretch", mean=tuple(cfg.mean), std=tuple(cfg.std)
    )
    frozen = args.frozen_stages * len(args.seeds) if len(args.frozen_stages) == 1 else args.frozen_stages
    if len(frozen) != len(args.seeds):
        raise ValueError("give one --frozen-stages value, or one per seed")
    members = [
        TrainConfig(
            architecture=kind,
            labels=labels,
            positive_label=args.positive_label,
            preprocessing=pre,
            weights_file=args.weights_file,
            epochs=args.epochs,
            stop_after=args.stop_after,
            ema_decay=args.ema_decay or None,
            head_epochs=args.head_epochs,
            frozen_stages=stages,
            batch_size=args.batch_size,
            lr=args.lr,
            sizes=args.sizes,
            seed=seed,
            workers=args.workers,
            threads=args.threads,
            device=args.device,
            max_train=args.max_train,
        )
        for seed, stages, kind in zip(args.seeds, frozen, kinds, strict=True)
    ]
    config = BuildConfig(
        data=args.data,
        out=args.out,
        run_dir=args.run_dir,
        name=args.name,
        version=args.version,
        members=members,
        card=json.loads(args.card_template.read_text()) if args.card_template else {},
        tta=args.tta,
        hard_fraction=args.hard_fraction,
        valid_fraction=args.valid_fraction,
        split_seed=args.split_seed,
        perturbations=args.perturb,
        perturbation_images=args.perturb_images,
        resume=args.resume,
        device=args.device,
        command=shlex.join(["python", "-m", "models.cli", *[a for a in sys.argv[1:] if a != "--resume"]]),
    )
    card = build_bundle(config)
    hard = card.validation_metrics["hard_validation"]
    summary = {k: hard[k] for k in ("auroc", "auroc_ci95", "ece", "mean_risk_normal")}
    print(json.dumps({"bundle": str(args.out), "ref": card.ref, "hard_validation": summary}, indent=2))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a bundle on a labelled folder or CSV; write ``report.json`` and ``report.png``.

    Args:
        args: the parsed ``evaluate`` arguments.

    Returns:
        The process exit code.
    """
    from models.bundle import load_bundle
    from models.data import list_samples, validation_splits
    from models.evaluate import compact, evaluate_bundle, write_report

    bundle = load_bundle(args.bundle, args.device)
    samples = list_samples(args.data, bundle.card.labels)
    if args.part != "all":
        parts = validation_splits(samples, args.hard_fraction, args.valid_fraction, args.split_seed)
        samples = parts[PARTS.index(args.part)]
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
    train.add_argument(
        "--architecture",
        type=lambda text: text.split(","),
        default=["tf_efficientnet_lite0"],
        help="timm name, one or one per seed (tf_efficientnet_lite0,tf_efficientnet_lite1)",
    )
    train.add_argument("--weights-file", type=Path, help="local pretrained weights (timm names)")
    train.add_argument("--input-size", type=int, default=224)
    train.add_argument("--epochs", type=int, default=4)
    train.add_argument("--stop-after", type=int, help="stop after N epochs of the --epochs schedule")
    train.add_argument("--head-epochs", type=int, default=1, help="epochs training only the new head")
    train.add_argument(
        "--frozen-stages",
        type=_ints,
        default=(3,),
        help="stem + this many stages stay frozen (one, or per seed)",
    )
    train.add_argument("--sizes", type=_ints, default=(160, 192), help="input size of the first epochs")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-4, help="peak head learning rate")
    train.add_argument(
        "--ema-decay", type=float, default=0.98, help="keep the weight average (0: keep the last weights)"
    )
    train.add_argument("--seeds", type=_ints, default=(0,), help="one ensemble member per seed")
    train.add_argument("--tta", choices=("none", "hflip"), default="none")
    train.add_argument("--hard-fraction", type=float, default=0.2, help="of each acquisition series")
    train.add_argument("--valid-fraction", type=float, default=0.15, help="patient-wise, of the rest")
    train.add_argument("--split-seed", type=int, default=0)
    train.add_argument("--max-train", type=int, help="subsample the training part")
    train.add_argument("--workers", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--device", default="cpu")
    train.add_argument(
        "--perturb", nargs="*", default=list(PERTURBATION_NAMES), choices=list(PERTURBATION_NAMES)
    )
    train.add_argument("--perturb-images", type=int, default=300, help="hard-validation images perturbed")
    train.add_argument("--resume", action="store_true", help="continue from RUN_DIR/member-N/last.pt")
    train.set_defaults(func=run_train)

    evaluate = subparsers.add_parser("evaluate", help="measure a bundle on labelled images")
    evaluate.add_argument("--bundle", type=Path, required=True)
    evaluate.add_argument("--data", type=Path, required=True, help="folder LABEL/* (.jpeg/.png/.dcm) or CSV")
    evaluate.add_argument("--out", type=Path, default=Path("runs/evaluate"))
    evaluate.add_argument("--part", choices=[*PARTS, "all"], default="all", help="part of the training split")
    evaluate.add_argument("--hard-fraction", type=float, default=0.2)
    evaluate.add_argument("--valid-fraction", type=float, default=0.15)
    evaluate.add_argument("--split-seed", type=int, default=0)
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
