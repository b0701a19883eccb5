"""Fine-tune an ImageNet network on grey radiographs, on CPU or one GPU.

Data comes from :mod:`models.data` (listing, splits, augmentation). Practice (fast.ai and
the robustness literature): frozen early stages with the new head trained first (linear
probe, then fine-tune: Kumar et al. 2022), discriminative learning rates under a one-cycle
schedule, class-balanced sampling, label smoothing, radiograph augmentation (no vertical
flips), progressive resizing (smaller images in the first epochs), an exponential moving
average of the weights (the network returned), AMP + channels_last on CUDA, a checkpoint
per epoch and ``resume``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.data import Augment, GrayDataset, Sample, balanced_epoch
from models.preprocess import Preprocessing
from models.pretrained import LITE_PACKAGES, pretrained_network


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the model card)."""

    architecture: str = "tf_efficientnet_lite0"
    labels: tuple[str, ...] = ("normal", "pneumonia")
    positive_label: str = "pneumonia"
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
    sizes: tuple[int, ...] = ()
    """Input size per epoch (progressive resizing); empty or exhausted: the preprocessing's."""
    balanced: bool = True
    """Class-balanced sampling (:func:`models.data.balanced_epoch`) instead of a class-weighted loss."""
    ema_decay: float | None = 0.98
    """Per-step decay of the weight average returned (None: the last weights)."""
    stop_after: int | None = None
    """Stop after this many epochs of the ``epochs``-long schedule (a run cut short for time;
    the learning rate has then not annealed). None: the whole schedule."""
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
        packaged = LITE_PACKAGES.get(self.architecture, "").replace("_", "-")
        record["weights_file"] = str(self.weights_file) if self.weights_file else f"{packaged}==0.1.0"
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


def _loader(
    dataset: GrayDataset, config: TrainConfig, order: Sequence[int] | None = None
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Batches of ``dataset``: in ``order`` (training, last partial batch dropped) or as listed."""
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=order,
        num_workers=config.workers,
        drop_last=order is not None,
        persistent_workers=config.workers > 0,
    )


def eval_loader(samples: Sequence[Sample], config: TrainConfig) -> DataLoader[tuple[torch.Tensor, int]]:
    """An un-augmented, ordered loader (validation, test)."""
    return _loader(GrayDataset(samples, config.preprocessing), config)


def epoch_order(samples: Sequence[Sample], config: TrainConfig, epoch: int) -> list[int]:
    """The training images of one epoch, in order: class-balanced or a seeded shuffle of all."""
    if config.balanced:
        return balanced_epoch(samples, config.seed, epoch)
    order = list(range(len(samples)))
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    return order


def epoch_size(config: TrainConfig, epoch: int) -> int:
    """Input size of ``epoch`` under progressive resizing."""
    return config.sizes[epoch] if epoch < len(config.sizes) else config.preprocessing.input_size


def positive_auroc(logits: np.ndarray, labels: np.ndarray, positive_index: int) -> float:
    """AUROC of the positive class's softmax column against ``labels == positive_index``.

    Args:
        logits: ``(N, C)`` logits.
        labels: ``(N,)`` class indices.
        positive_index: the positive label's column (not necessarily 1).
    """
    scores = torch.softmax(torch.from_numpy(logits), 1)[:, positive_index].numpy()
    return float(roc_auc_score(labels == positive_index, scores))


def fit(
    config: TrainConfig, train: Sequence[Sample], valid: Sequence[Sample], run_dir: Path, resume: bool = False
) -> TrainResult:
    """Fine-tune a pretrained network, validating and checkpointing every epoch.

    Args:
        config: the run's settings.
        train: training samples.
        valid: validation samples (positive-class AUROC and loss are logged per epoch).
        run_dir: folder for ``last.pt`` and ``epoch-N.pt`` checkpoints and ``history.json``.
        resume: continue from ``run_dir/last.pt`` if it exists (a finished run is not redone).

    Returns:
        The :class:`TrainResult`; its network is the weight average when ``ema_decay`` is set.

    Raises:
        ValueError: for a configuration that cannot train (e.g. no training sample).
    """
    if not train or not valid:
        raise ValueError("training and validation sets must not be empty")
    started = time.monotonic()
    seed_everything(config.seed)
    torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    positive = config.labels.index(config.positive_label)
    if config.max_train is not None:
        train = random.Random(config.seed).sample(list(train), min(config.max_train, len(train)))
    network = pretrained_network(config.architecture, len(config.labels), config.weights_file)
    frozen = freeze_early(network, config.frozen_stages)
    network.to(device).to(memory_format=torch.channels_last)
    weight = None if config.balanced else class_weights(train, len(config.labels)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    train_set = GrayDataset(train, config.preprocessing, config.augment, config.seed)
    steps_per_epoch = len(epoch_order(train, config, 0)) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError("fewer training images than one batch")
    valid_loader = eval_loader(valid, config)

    run_dir.mkdir(parents=True, exist_ok=True)
    last = run_dir / "last.pt"
    checkpoint = (
        torch.load(last, map_location="cpu", weights_only=False) if resume and last.is_file() else None
    )
    if checkpoint is not None:
        lr, curve = checkpoint["lr"], checkpoint["lr_curve"]
    elif config.lr is None:
        lr, curve = lr_find(
            network, _loader(train_set, config, epoch_order(train, config, 0)), loss_fn, device
        )
        lr = float(np.clip(lr, 1e-4, 2e-3))
        tqdm.write(f"lr finder suggests {lr:.2e}")
    else:
        lr, curve = config.lr, []

    groups, head = parameter_groups(network, lr, config.lr_decay, config.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in groups],
        total_steps=config.epochs * steps_per_epoch,
        pct_start=config.pct_start,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    average = (
        AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)  # type: ignore[no-untyped-call]
        if config.ema_decay is not None
        else None
    )
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        network.load_state_dict(checkpoint["network"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        if average is not None:
            average.load_state_dict(checkpoint["average"])
        history, start_epoch = checkpoint["history"], checkpoint["epoch"]
        torch.set_rng_state(checkpoint["torch_rng"])
        tqdm.write(f"resumed after epoch {start_epoch}")
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0
    head_ids = {id(p) for p in head}
    body = [p for g in groups for p in g["params"] if id(p) not in head_ids]

    last_epoch = config.epochs if config.stop_after is None else min(config.stop_after, config.epochs)
    for epoch in range(start_epoch, last_epoch):
        # Gradual unfreezing: the new head first, then the unfrozen stages join.
        for param in body:
            param.requires_grad_(epoch >= config.head_epochs)
        train_set.epoch = epoch
        train_set.size = epoch_size(config, epoch)
        network.train()
        for module in frozen:
            module.eval()
        total, count = 0.0, 0
        loader = _loader(train_set, config, epoch_order(train, config, epoch))
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, total=steps_per_epoch)
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
            if average is not None and epoch >= config.head_epochs:
                average.update_parameters(network)
            total += loss.item() * len(targets)
            count += len(targets)
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        scored = average.module if average is not None and epoch >= config.head_epochs else network
        logits, labels = predict_logits(scored, valid_loader, device, desc="validate")
        valid_loss = float(
            torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
        )
        record = {
            "epoch": epoch + 1,
            "input_size": train_set.size,
            "train_loss": total / max(count, 1),
            "valid_loss": valid_loss,
            "valid_auroc": positive_auroc(logits, labels, positive),
            "elapsed_s": elapsed_before + time.monotonic() - started,
        }
        history.append(record)
        tqdm.write(json.dumps(record))
        state = {
            "architecture": config.architecture,
            "network": network.state_dict(),
            "average": average.state_dict() if average is not None else None,
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
    averaged = average is not None and last_epoch > config.head_epochs
    result = average.module if average is not None and averaged else network
    return TrainResult(result.eval(), history, lr, curve, wall, len(train))
