"""Model bundles: ``card.json`` + ``weights.safetensors`` (+ more members), verified before use.

A bundle is a folder loaded from local disk only. ``card.json`` is validated by
:class:`ModelCard` (data, never code); every weights file's sha256 is recorded in the card
and checked on every load, and a mismatch refuses the bundle.

An *ensemble* bundle lists its networks in ``members`` (the first is always
``weights.safetensors``); it scores a batch as the mean of the members' logits, optionally
over the batch and its horizontal mirror (``tta: "hflip"``), in one batched call
(:class:`Ensemble`), so the service's batched path serves it unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from models.inference import prepare
from models.preprocess import Preprocessing

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"


class BundleError(Exception):
    """A bundle cannot be loaded: missing files, invalid card or weights."""


class ChecksumMismatch(BundleError):
    """The weights file does not match the sha256 recorded in the card."""


class IntendedUse(BaseModel):
    """What the model is for; the service gates studies on ``body_parts`` and ``modalities``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: str
    body_parts: tuple[str, ...] = ("CHEST",)
    modalities: tuple[str, ...] = ("CR", "DX")
    population: str = ""
    age_bands: tuple[str, ...] = ()
    """Age bands (``models.preprocess.AGE_BANDS``) the model is for; empty: any age. A study
    whose header gives another band is not analysed; one with no usable age is."""


class Thresholds(BaseModel):
    """Cut-offs on the calibrated probability that place a case in a risk tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    critical: float = Field(ge=0.0, le=1.0)
    elevated: float = Field(ge=0.0, le=1.0)
    rationale: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.elevated > self.critical:
            raise ValueError("the elevated threshold must not exceed the critical one")
        return self


class Member(BaseModel):
    """One network of an ensemble bundle: its weights file, architecture and sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\.safetensors$")
    architecture: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ModelCard(BaseModel):
    """The metadata a bundle travels with (after MONAI bundles and model cards)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")
    architecture: str
    labels: tuple[str, ...] = Field(min_length=2)
    positive_label: str
    preprocessing: Preprocessing = Preprocessing()
    temperature: float = Field(1.0, gt=0.0)
    thresholds: Thresholds
    intended_use: IntendedUse
    data_provenance: str = ""
    training: dict[str, Any] = Field(default_factory=dict)
    validation_metrics: dict[str, Any] = Field(default_factory=dict)
    limitations: tuple[str, ...] = ()
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    members: tuple[Member, ...] = ()
    """Every network of an ensemble, the first being ``weights.safetensors`` (empty: one network)."""
    tta: Literal["none", "hflip"] = "none"
    """``hflip``: also score the mirrored image and average the logits."""

    @model_validator(mode="after")
    def _positive_is_a_label(self) -> ModelCard:
        if self.positive_label not in self.labels:
            raise ValueError("positive_label must be one of labels")
        return self

    @model_validator(mode="after")
    def _members_start_with_the_weights(self) -> ModelCard:
        if not self.members:
            return self
        first = self.members[0]
        if (first.file, first.architecture, first.sha256) != (
            WEIGHTS_FILE,
            self.architecture,
            self.weights_sha256,
        ):
            raise ValueError(
                f"the first member must be {WEIGHTS_FILE} with the card's architecture and sha256"
            )
        if len({m.file for m in self.members}) != len(self.members):
            raise ValueError("ensemble members must have distinct files")
        return self

    @property
    def networks(self) -> tuple[Member, ...]:
        """Every network of the bundle (one for a plain bundle)."""
        return self.members or (
            Member(file=WEIGHTS_FILE, architecture=self.architecture, sha256=self.weights_sha256),
        )

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @property
    def ref(self) -> str:
        """``name@version``, the identifier stored with every prediction."""
        return f"{self.name}@{self.version}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def create_network(architecture: str, num_classes: int) -> torch.nn.Module:
    """An untrained timm network; weights come from a bundle or a local pretrained file."""
    return timm.create_model(architecture, pretrained=False, num_classes=num_classes)


def read_card(path: Path) -> ModelCard:
    """Read and validate ``card.json`` of the bundle folder ``path``.

    Raises:
        BundleError: if the card is missing or invalid.
    """
    card_path = path / CARD_FILE
    try:
        return ModelCard.model_validate_json(card_path.read_bytes())
    except FileNotFoundError as exc:
        raise BundleError(f"no {CARD_FILE} in {path}") from exc
    except ValueError as exc:
        raise BundleError(f"invalid {CARD_FILE} in {path}: {exc}") from exc


def verify_bundle(path: Path) -> ModelCard:
    """Validate the card and check every weights file's sha256 without building a network.

    Raises:
        BundleError: missing or invalid files.
        ChecksumMismatch: a weights file does not match the card.
    """
    card = read_card(path)
    for member in card.networks:
        weights = path / member.file
        if not weights.is_file():
            raise BundleError(f"no {member.file} in {path}")
        actual = sha256_file(weights)
        if actual != member.sha256:
            raise ChecksumMismatch(f"{weights} has sha256 {actual}, the card records {member.sha256}")
    return card


def member_file(index: int) -> str:
    """The weights file of ensemble member ``index`` (the first is ``weights.safetensors``)."""
    return WEIGHTS_FILE if index == 0 else f"weights-{index}.safetensors"


def save_bundle(
    path: Path,
    card_fields: dict[str, Any],
    state_dicts: dict[str, torch.Tensor] | Sequence[dict[str, torch.Tensor]],
    *,
    half: bool = True,
    architectures: Sequence[str] = (),
) -> ModelCard:
    """Write a bundle folder: weights (fp16 by default) then a card carrying their sha256.

    Args:
        path: the folder to create (or overwrite files in).
        card_fields: every :class:`ModelCard` field except ``weights_sha256`` and ``members``.
        state_dicts: the network's weights, or one state dict per ensemble member (all of
            the card's architecture); a list of one writes a plain bundle.
        half: store floating-point tensors as fp16 (halves the size; scores agree to ~1e-3).
        architectures: one per member where they differ (the first must be the card's);
            empty: every member is of the card's architecture.

    Returns:
        The validated card that was written.
    """
    path.mkdir(parents=True, exist_ok=True)
    states = [state_dicts] if isinstance(state_dicts, dict) else list(state_dicts)
    kinds = list(architectures) or [card_fields["architecture"]] * len(states)
    if len(kinds) != len(states):
        raise ValueError("give one architecture per member, or none")
    members = []
    for index, (state, kind) in enumerate(zip(states, kinds, strict=True)):
        tensors = {
            key: (value.half() if half and value.is_floating_point() else value).contiguous().cpu()
            for key, value in state.items()
        }
        weights = path / member_file(index)
        save_file(tensors, str(weights))
        members.append(Member(file=weights.name, architecture=kind, sha256=sha256_file(weights)))
    card = ModelCard.model_validate(
        {
            **card_fields,
            "weights_sha256": members[0].sha256,
            "members": [m.model_dump() for m in members] if len(members) > 1 else [],
        }
    )
    (path / CARD_FILE).write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return card


class Ensemble(torch.nn.Module):
    """Mean logits of several networks, optionally over each image and its mirror, in one batch."""

    def __init__(self, members: Sequence[torch.nn.Module], hflip: bool) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.hflip = hflip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = torch.cat([x, x.flip(-1)]) if self.hflip else x
        logits = torch.stack([member(views) for member in self.members]).mean(dim=0)
        if self.hflip:
            logits = (logits[: len(x)] + logits[len(x) :]) / 2
        return logits


def networks_of(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The member networks of an :class:`Ensemble`, or ``[network]``."""
    return list(network.members) if isinstance(network, Ensemble) else [network]


class Bundle:
    """A verified bundle with its network (or :class:`Ensemble`) loaded, ready to score batches."""

    def __init__(
        self, card: ModelCard, network: torch.nn.Module, device: torch.device, *, amp: bool = False
    ) -> None:
        self.card = card
        self.network = network
        self.device = device
        self.amp = amp
        """bf16 autocast (CUDA by default)."""

    @torch.inference_mode()
    def logits(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Raw logits for a ``(N, 3, S, S)`` batch of :func:`models.preprocess.to_input` outputs."""
        inputs = torch.as_tensor(batch, dtype=torch.float32)
        if self.device.type == "cuda":
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
        # channels_last on every device: ~3x faster than NCHW for this network on CPU too.
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits: torch.Tensor = self.network(inputs)
        return logits.float().cpu()

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Calibrated probability of the positive label for each image of the batch."""
        probs = torch.softmax(self.logits(batch) / self.card.temperature, dim=1)
        return probs[:, self.card.positive_index].numpy().astype(np.float64)


def load_bundle(
    path: Path, device: str = "cpu", *, amp: bool = False, compile: bool = False, rewrite: bool = True
) -> Bundle:
    """Verify and load a bundle folder.

    Args:
        path: the bundle folder (``card.json`` + every member's weights file).
        device: a torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.
        amp: bf16 autocast (opt-in, any device). Off by default: bf16 moves a mid-range score
            of the default bundle by up to 0.07 (tests/models/test_inference.py), enough to
            change a tier near a threshold, and a site's GPU and CPU workers must agree. The
            network is channels_last on every device.
        compile: wrap the network with ``torch.compile`` (slower start, faster steady state).
        rewrite: pad inside the convolutions and, in fp32, fold batch norms into them
            (:mod:`models.inference`: ~1.8x faster on CPU, the same scores); False keeps
            the network as trained (the benchmarks' baseline).

    Returns:
        The loaded :class:`Bundle`, network in eval mode.

    Raises:
        BundleError: missing files, invalid card, or weights that do not fit the architecture.
        ChecksumMismatch: a weights file does not match the card's sha256.
    """
    card = verify_bundle(path)
    target = torch.device(device)
    use_amp = amp
    members = []
    for member in card.networks:
        network = create_network(member.architecture, num_classes=len(card.labels))
        state = {k: v.float() for k, v in load_file(str(path / member.file)).items()}
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{member.file} in {path} does not fit {member.architecture}: {exc}") from exc
        network.to(target).to(memory_format=torch.channels_last).eval()
        if rewrite:
            network = prepare(network, card.preprocessing.input_size, fold_norms=not use_amp)
        members.append(network)
    single = len(members) == 1 and card.tta == "none"
    network = members[0] if single else Ensemble(members, hflip=card.tta == "hflip").eval()
    if compile:
        network = torch.compile(network)  # type: ignore[assignment]
    return Bundle(card, network, target, amp=use_amp)
