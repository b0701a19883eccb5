"""Turn stored pixels into model input: one path for training and for serving.

Train/serve skew is a classic silent failure, so the trainer and the service both call
:func:`gray_from_dicom` / :func:`gray_from_image` and then :func:`to_input`. Every
function works on a single 2-D grey image in ``[0, 1]`` with the MONOCHROME2 convention
(bright = dense, as on a lightbox).
"""

from __future__ import annotations

import io
import re
import warnings
from datetime import datetime
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field


class Preprocessing(BaseModel):
    """How a bundle expects its input; part of ``card.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(224, ge=16, le=2048)
    resize: Literal["stretch", "pad"] = "stretch"
    """``stretch`` matches training data that was resized without keeping aspect ratio;
    ``pad`` keeps the aspect ratio and pads with black."""
    percentile_low: float = Field(0.5, ge=0.0, lt=50.0)
    percentile_high: float = Field(99.5, gt=50.0, le=100.0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _percentile_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    windowed: np.ndarray = np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return windowed


def _first(value: object) -> float:
    """A DICOM multi-valued number (e.g. several VOI windows) -> its first value."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def gray_from_dicom(ds: object, pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Window a decoded DICOM frame into a ``[0, 1]`` grey image.

    Applies, in order: the modality LUT (Rescale Slope/Intercept), the first VOI window
    (Window Center/Width, linear function of PS3.3 C.11.2.1.2) if the header has one,
    otherwise a robust percentile window, then inverts MONOCHROME1 so that bone is bright.

    Args:
        ds: the pydicom ``Dataset`` the pixels came from (header values only are read).
        pixels: the decoded 2-D frame (``ds.pixel_array``).
        pre: the bundle's preprocessing settings.

    Returns:
        ``float32`` array of the frame's shape, values in ``[0, 1]``.

    Raises:
        ValueError: if ``pixels`` is not a 2-D array.
    """
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D grey frame, got shape {pixels.shape}")
    values = pixels.astype(np.float32)
    slope = getattr(ds, "RescaleSlope", None)
    intercept = getattr(ds, "RescaleIntercept", None)
    if slope is not None or intercept is not None:
        values = values * (_first(slope) if slope is not None else 1.0) + (
            _first(intercept) if intercept is not None else 0.0
        )

    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    gray: np.ndarray | None = None
    if center is not None and width is not None:
        c, w = _first(center), _first(width)
        if w > 1.0:
            gray = np.clip((values - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
            # A window that leaves the image almost flat is a bad header, not a bad image.
            if float(gray.std()) < 1e-3:
                gray = None
    if gray is None:
        gray = _percentile_window(values, pre.percentile_low, pre.percentile_high)

    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        gray = 1.0 - gray
    return gray


def gray_from_image(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Convert a PNG/JPEG picture into a ``[0, 1]`` grey image.

    8-bit pictures are divided by 255 (the training data is 8-bit JPEG and is read this
    way); deeper pictures (16-bit PNG) get the robust percentile window.

    Args:
        image: an opened PIL image.
        pre: the bundle's preprocessing settings.

    Returns:
        ``float32`` 2-D array with values in ``[0, 1]``.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        return _percentile_window(values, pre.percentile_low, pre.percentile_high)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


class DecodeError(Exception):
    """Stored bytes whose pixels cannot be decoded (broken codestream, bad header values)."""


def decode_dicom(data: bytes) -> tuple[pydicom.Dataset, np.ndarray]:
    """Parse a DICOM file and decode its (first) frame.

    Raises:
        DecodeError: any failure of the parser or the pixel decoders, with its type only.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for _element in ds:  # values convert lazily; force it here, inside the boundary
            pass
        return ds, np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise anything: ValueError, RuntimeError, struct.error...
        raise DecodeError(f"cannot decode DICOM pixels ({type(exc).__name__})") from None


def open_picture(data: bytes, formats: tuple[str, ...] = ("PNG", "JPEG")) -> Image.Image:
    """Open and fully load a PNG/JPEG, treating PIL's decompression-bomb warning as an error.

    Raises:
        DecodeError: unreadable, truncated or bomb-sized pictures.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(formats))
            image.load()
        return image
    except Exception as exc:
        raise DecodeError(f"cannot decode picture ({type(exc).__name__})") from None


def is_grey(image: Image.Image, tolerance: float = 8.0) -> bool:
    """True if a picture is greyscale, also when stored as RGB with equal channels."""
    if image.mode not in ("RGB", "RGBA"):
        return image.mode not in ("P", "CMYK", "YCbCr", "LAB", "HSV")
    rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    spread = np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
    return float(spread.mean()) <= tolerance


def resize(gray: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Resize a ``[0, 1]`` grey image to the square model input (stretch or pad)."""
    size = pre.input_size
    picture = Image.fromarray(gray.astype(np.float32), mode="F")
    if pre.resize == "stretch":
        return np.asarray(picture.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    h, w = gray.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(picture.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[top : top + nh, left : left + nw] = small
    return out


def normalize(gray: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Repeat a resized grey image over 3 channels and apply the card's mean/std."""
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    return ((np.broadcast_to(gray, (3, *gray.shape)) - mean) / std).astype(np.float32)


def to_input(gray: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """A ``[0, 1]`` grey image of any size -> ``(3, S, S)`` normalised model input."""
    return normalize(resize(gray, pre), pre)


AGE_BANDS = ((1, "<1 y"), (6, "1–5 y"), (18, "6–17 y"), (65, "18–64 y"), (90, "65–89 y"))
"""Upper bounds (years, exclusive) of the coarse age bands: kept on a case for the reader and
matched against a card's intended population. 90 and over is one band (HIPAA Safe Harbor);
neither an exact age nor a date of birth is ever stored."""

_AGE = re.compile(r"^(\d{1,3})([DWMY]?)$")
_YEARS_PER = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def age_band(patient_age: str | None, birth_date: str | None, study_date: str | None) -> str | None:
    """The coarse age band of a study from PatientAge (``nnnD|W|M|Y``), else from the dates.

    A bare number is read as years (``"62"``: common in headers that bend the standard).
    Anything malformed gives None: an unknown age never refuses an upload.
    """
    years: float
    if patient_age and (found := _AGE.match(patient_age.strip())):
        years = int(found.group(1)) * _YEARS_PER[found.group(2) or "Y"]
    elif birth_date and study_date:
        try:
            born = datetime.strptime(birth_date.strip()[:8], "%Y%m%d")
            seen = datetime.strptime(study_date.strip()[:8], "%Y%m%d")
        except ValueError:
            return None
        if seen < born:
            return None
        years = seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day))
    else:
        return None
    return next((band for upper, band in AGE_BANDS if years < upper), "90+ y")
