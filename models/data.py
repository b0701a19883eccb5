"""Training data: listing, the two validation splits, augmentation and the perturbation suite.

Two ways to hold images out, both by whole patients:

- :func:`split_by_patient`: a random patient-wise split. On this archive it is nearly
  saturated (AUROC ~0.995) and said little about unseen images (0.952).
- :func:`split_by_acquisition`: the *hard* split. File names carry acquisition series
  (``IM-NNNN`` normals, ``NORMAL2-IM-NNNN`` normals, ``personN_bacteria``, ``personN_virus``)
  numbered in acquisition order; it holds out the earliest-numbered patients of every
  series, i.e. whole contiguous acquisition batches that training never sees a neighbour of.

Every image goes through :mod:`models.preprocess` (the service's own functions); augmentation
and perturbations act on the ``[0, 1]`` MONOCHROME2 grey image before
:func:`~models.preprocess.to_input`.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from pydicom.dataset import Dataset as DicomDataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from torch.utils.data import Dataset

from models.preprocess import Preprocessing, gray_from_dicom, gray_from_image, normalize, resize

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")
_PERSON = re.compile(r"^(person\d+)_", re.IGNORECASE)
_IM_SERIES = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)
_SERIES_NUMBER = re.compile(r"^(?:person|(?:NORMAL2-)?IM-)(\d+)", re.IGNORECASE)


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


def acquisition_series(sample: Sample) -> tuple[str, int]:
    """The acquisition series an image belongs to and its number in it, from the file name.

    ``IM-0115-0001.jpeg`` -> ``("IM", 115)``; ``NORMAL2-IM-0383-0001.jpeg`` ->
    ``("NORMAL2-IM", 383)``; ``person12_virus_44.jpeg`` -> ``("virus", 12)``. A name that
    follows none of these is series ``other``, number 0.
    """
    name = sample.path.name
    match = _SERIES_NUMBER.match(name)
    if match is None:
        return "other", 0
    number = int(match.group(1))
    if name.lower().startswith("person"):
        return sample.subgroup, number
    return ("NORMAL2-IM" if name.upper().startswith("NORMAL2-") else "IM"), number


def split_by_acquisition(samples: Sequence[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """The hard split: hold out the earliest-numbered patients of every acquisition series.

    Within each series (see :func:`acquisition_series`) patients are ordered by number and
    the lowest are held out until ``fraction`` of the series' images is reached, so whole
    contiguous acquisition batches leave training and both classes stay represented. The
    archive's own numbering starts at ``IM-0115`` and ``NORMAL2-IM-0383``: the lower numbers
    are not in it, and the earliest blocks that are lie nearest to them. Deterministic.

    Args:
        samples: the images.
        fraction: share of each series' images to hold out, in ``(0, 1)``.

    Returns:
        ``(kept, held_out)``, each sorted by path; no patient is in both.

    Raises:
        ValueError: for a fraction outside ``(0, 1)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    by_patient: dict[str, list[Sample]] = {}
    for sample in samples:
        by_patient.setdefault(sample.patient, []).append(sample)
    series: dict[str, list[tuple[int, str]]] = {}
    for patient, group in by_patient.items():
        name, number = acquisition_series(group[0])
        series.setdefault(name, []).append((number, patient))
    held: set[str] = set()
    for members in series.values():
        total = sum(len(by_patient[p]) for _, p in members)
        taken = 0
        for _, patient in sorted(members):
            if taken >= fraction * total:
                break
            held.add(patient)
            taken += len(by_patient[patient])
    kept = sorted((s for s in samples if s.patient not in held), key=lambda s: str(s.path))
    out = sorted((s for s in samples if s.patient in held), key=lambda s: str(s.path))
    return kept, out


def validation_splits(
    samples: Sequence[Sample], hard_fraction: float, valid_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """``(train, patient_valid, hard_valid)``: the hard split first, then patients at random.

    Args:
        samples: every labelled image.
        hard_fraction: share of each acquisition series held out (:func:`split_by_acquisition`).
        valid_fraction: share of the remaining images held out by patient (:func:`split_by_patient`).
        seed: the patient split's seed.
    """
    kept, hard = split_by_acquisition(samples, hard_fraction)
    train, valid = split_by_patient(kept, (1.0 - valid_fraction, valid_fraction), seed)
    return train, valid, hard


def balanced_epoch(samples: Sequence[Sample], seed: int, epoch: int) -> list[int]:
    """Indices for one class-balanced epoch: every image of the rarest class, as many of each other.

    The archive is 74 % pneumonia, a new site's intake far less; sampling the classes
    equally (a fresh draw of the common class each epoch) keeps the network from learning
    the archive's prevalence and shortens an epoch on CPU.

    Args:
        samples: the training images.
        seed: the run's seed.
        epoch: the epoch number (each epoch draws anew).

    Returns:
        Shuffled indices into ``samples``.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    by_label: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_label.setdefault(sample.label, []).append(index)
    size = min(len(group) for group in by_label.values())
    picked = [i for label in sorted(by_label) for i in rng.sample(by_label[label], size)]
    rng.shuffle(picked)
    return picked


@dataclass(frozen=True)
class Augment:
    """Radiograph augmentation on a ``[0, 1]`` grey image (horizontal flips, never vertical).

    Geometry (random resized crop, small rotation/scale/shift, horizontal flip: laterality
    markers flip with it), then acquisition changes (lower resolution, blur,
    brightness/contrast/gamma, JPEG re-encoding, noise), then a dark or bright strip along
    one border (collimation edges, film borders): the shifts expected between one site's
    archive and the next. The output keeps the input's size.
    """

    crop_scale: tuple[float, float] = (0.7, 1.0)
    crop_ratio: tuple[float, float] = (0.8, 1.25)
    p_flip: float = 0.5
    rotate: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05
    contrast: tuple[float, float] = (0.7, 1.35)
    brightness: float = 0.08
    gamma: tuple[float, float] = (0.65, 1.5)
    p_lowres: float = 0.3
    p_blur: float = 0.2
    p_jpeg: float = 0.3
    p_noise: float = 0.2
    p_border: float = 0.3
    border: float = 0.12

    def __call__(self, gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return an augmented copy of ``gray`` (same shape, values in ``[0, 1]``)."""
        h, w = gray.shape
        image = torch.from_numpy(np.ascontiguousarray(gray))[None]
        area = h * w * rng.uniform(*self.crop_scale)
        ratio = math.exp(rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])))
        ch = min(h, round(math.sqrt(area / ratio)))
        cw = min(w, round(math.sqrt(area * ratio)))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = TF.resized_crop(image, top, left, ch, cw, [h, w], antialias=True)
        if rng.random() < self.p_flip:
            image = TF.horizontal_flip(image)
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
            out = jpeg_reencode(out, int(rng.integers(30, 95)))
        if rng.random() < self.p_noise:
            out = out + rng.normal(0.0, rng.uniform(0.005, 0.03), out.shape)
        if rng.random() < self.p_border:
            out = with_border(
                out, int(rng.integers(0, 4)), rng.uniform(0.02, self.border), float(rng.random() < 0.5)
            )
        clipped: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
        return clipped


class GrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples -> normalised ``(3, S, S)`` tensors, augmented deterministically per epoch.

    ``size`` overrides the preprocessing's input size (progressive resizing trains the
    first epochs smaller); validation and serving use the bundle's size.
    """

    def __init__(
        self, samples: Sequence[Sample], pre: Preprocessing, augment: Augment | None = None, seed: int = 0
    ) -> None:
        self.samples = list(samples)
        self.pre = pre
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.size = pre.input_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        gray = load_gray(sample.path, self.pre)
        if self.augment is not None:
            gray = self.augment(gray, np.random.default_rng([self.seed, self.epoch, index]))
        pre = (
            self.pre
            if self.size == self.pre.input_size
            else self.pre.model_copy(update={"input_size": self.size})
        )
        return torch.from_numpy(normalize(resize(gray, pre), pre)), sample.label


Perturbation = Callable[[np.ndarray, Preprocessing], np.ndarray]


def jpeg_reencode(gray: np.ndarray, quality: int) -> np.ndarray:
    """8-bit JPEG round trip at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=quality
    )
    return np.asarray(Image.open(buffer), dtype=np.float32) / 255.0


def with_border(gray: np.ndarray, side: int, width: float, value: float) -> np.ndarray:
    """A copy with a strip of ``value`` along one side (0 top, 1 right, 2 bottom, 3 left).

    Args:
        gray: a ``[0, 1]`` grey image.
        side: which border.
        width: the strip's width as a fraction of the image.
        value: its grey level (0 black collimation, 1 white film edge).
    """
    out = np.array(gray, dtype=np.float32)
    h, w = out.shape
    rows, cols = max(1, round(h * width)), max(1, round(w * width))
    if side == 0:
        out[:rows] = value
    elif side == 1:
        out[:, w - cols :] = value
    elif side == 2:
        out[h - rows :] = value
    else:
        out[:, :cols] = value
    return out


def with_marker(gray: np.ndarray) -> np.ndarray:
    """A copy with a bright burned-in marker (a 'text' block) in the upper right corner."""
    out = np.array(gray, dtype=np.float32)
    h, w = out.shape
    top, left = round(h * 0.05), round(w * 0.78)
    out[top : top + round(h * 0.06), left : left + round(w * 0.14)] = 1.0
    return out


def windowed(gray: np.ndarray, low: float, high: float) -> np.ndarray:
    """A narrower display window: ``[low, high]`` stretched to ``[0, 1]`` (clips the tails)."""
    return np.clip((gray - low) / (high - low), 0.0, 1.0).astype(np.float32)


def center_crop(gray: np.ndarray, fraction: float) -> np.ndarray:
    """The central ``fraction`` of each side (a tighter collimation / field of view)."""
    h, w = gray.shape
    dh, dw = round(h * (1 - fraction) / 2), round(w * (1 - fraction) / 2)
    return gray[dh : h - dh, dw : w - dw]


def padded(gray: np.ndarray, fraction: float) -> np.ndarray:
    """Black margins of ``fraction`` of each side around the image (a wider field of view)."""
    h, w = gray.shape
    dh, dw = round(h * fraction), round(w * fraction)
    return np.pad(gray, ((dh, dh), (dw, dw))).astype(np.float32)


def _resized(gray: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(
        Image.fromarray(gray, mode="F").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
    )


def dicom_round_trip(gray: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Store ``gray`` as a 12-bit MONOCHROME1 DICOM (no VOI window), read it back as the service does.

    The stored values are inverted (MONOCHROME1) with a rescale slope/intercept, written to
    bytes and decoded by pydicom; :func:`gray_from_dicom` then applies its percentile window
    and the inversion back, so contrast is not exactly the source's.

    Args:
        gray: a ``[0, 1]`` grey image.
        pre: the preprocessing settings.

    Returns:
        The grey image the service would compute from that DICOM.
    """
    stored = (4095 - np.round(np.clip(gray, 0, 1) * 4095)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = DicomDataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    read = pydicom.dcmread(buffer)
    return gray_from_dicom(read, read.pixel_array, pre)


PERTURBATIONS: dict[str, Perturbation] = {
    "original": lambda g, p: g,
    "resolution_112": lambda g, p: _resized(g, 112),
    "resolution_512": lambda g, p: _resized(g, 512),
    "jpeg_q20": lambda g, p: jpeg_reencode(g, 20),
    "contrast_0.6": lambda g, p: np.clip((g - g.mean()) * 0.6 + g.mean(), 0, 1),
    "gamma_0.6": lambda g, p: g**0.6,
    "gamma_1.6": lambda g, p: g**1.6,
    "window_narrow": lambda g, p: windowed(g, 0.15, 0.85),
    "dicom12_monochrome1": dicom_round_trip,
    "crop_0.85": lambda g, p: center_crop(g, 0.85),
    "pad_0.08": lambda g, p: padded(g, 0.08),
    "border_right_white": lambda g, p: with_border(g, 1, 0.08, 1.0),
    "border_left_black": lambda g, p: with_border(g, 3, 0.08, 0.0),
    "marker": lambda g, p: with_marker(g),
}
"""The perturbation suite: each a shift a new site may bring (resolution, re-encoding,
contrast, windowing, MONOCHROME1 12-bit DICOM, field of view, borders, burned-in markers)."""
