"""Turn stored pixels into model input: one path for training and for serving.

Train/serve skew is a classic silent failure, so the trainer and the service both call
:func:`gray_from_dicom` / :func:`gray_from_image` and then :func:`to_input`. Every
function works on a single 2-D grey image in ``[0, 1]`` with the MONOCHROME2 convention
(bright = dense, as on a lightbox).
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import numpy as np
import pydicom
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from models import jpeg2000


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


def percentile_range(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles of ``values`` (its minimum and maximum when those
    percentiles coincide): the robust window used when a header gives none."""
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    return lo, hi


def _percentile_window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    lo, hi = percentile_range(values, low, high)
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
    values = modality_values(ds, pixels)
    window = header_window(ds, values)
    if window is not None:
        gray = _linear_window(values, *window)
    else:
        gray = _percentile_window(values, pre.percentile_low, pre.percentile_high)
    if is_monochrome1(ds):
        gray = 1.0 - gray
    return gray


def modality_values(ds: object, pixels: np.ndarray) -> np.ndarray:
    """Stored pixel values through the modality LUT (Rescale Slope/Intercept), as ``float32``."""
    values = pixels.astype(np.float32)
    slope = getattr(ds, "RescaleSlope", None)
    intercept = getattr(ds, "RescaleIntercept", None)
    if slope is not None or intercept is not None:
        values = values * (_first(slope) if slope is not None else 1.0) + (
            _first(intercept) if intercept is not None else 0.0
        )
    return values


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The VOI LUT's linear function (PS3.3 C.11.2.1.2), onto ``[0, 1]``."""
    windowed: np.ndarray = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0).astype(
        np.float32
    )
    return windowed


def header_window(ds: object, values: np.ndarray) -> tuple[float, float] | None:
    """The header's first VOI window (centre, width) for ``values`` (after the modality LUT),
    or None when there is none, its width is <= 1, or it leaves the image almost flat (a bad
    header, not a bad image)."""
    center = getattr(ds, "WindowCenter", None)
    width = getattr(ds, "WindowWidth", None)
    if center is None or width is None:
        return None
    c, w = _first(center), _first(width)
    if w <= 1.0 or float(_linear_window(values, c, w).std()) < 1e-3:
        return None
    return c, w


def is_monochrome1(ds: object) -> bool:
    """True for MONOCHROME1 (bright = less dense): such pixels are inverted for display."""
    return str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1"


DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
"""PIL modes of pictures deeper than 8 bits (16-bit PNG)."""


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
    if image.mode in DEEP_MODES:
        values = np.asarray(image, dtype=np.float32)
        return _percentile_window(values, pre.percentile_low, pre.percentile_high)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


class DecodeError(Exception):
    """Stored bytes whose pixels cannot be decoded (broken codestream, bad header values)."""


MAX_DECODED_BYTES = 256 * 1024 * 1024
"""Default bound on a decoded image (the service's ``max_decoded_bytes``): every decoder call
checks it first, so that no caller, the trainer included, can decode unbounded pixels."""

_JPEG_2000 = frozenset({JPEG2000Lossless, JPEG2000})
_JPEG = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})
_JPEG_LS = frozenset({JPEGLSLossless, JPEGLSNearLossless})
# JPEG SOF markers (not DHT C4, JPG C8, DAC CC), hierarchical JPEG's DHP (the final size, laid
# out as a SOF) and JPEG-LS's SOF55.
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xDE, 0xF7})


@dataclass(frozen=True)
class Codestream:
    """What a compressed frame's own header says it decodes to (it may differ from the DICOM
    header's: the decoders follow the codestream, so its size is the one to bound)."""

    rows: int
    columns: int
    components: int
    precision: int
    signed: bool = False
    levels: int = 0
    """JPEG 2000 wavelet decomposition levels: how many times the decoder can halve the size."""


def _u16(data: bytes, at: int) -> int:
    value: int = struct.unpack_from(">H", data, at)[0]
    return value


def _jp2_codestream_at(frame: bytes) -> int:
    """Where the codestream of a JP2 file (a non-conformant wrapper in DICOM) starts: the
    payload of its top-level ``jp2c`` box, the one the decoder reads."""
    at = 0
    while at + 8 <= len(frame):
        length, kind = struct.unpack_from(">I4s", frame, at)
        header = 8
        if length == 1:
            length, header = struct.unpack_from(">Q", frame, at + 8)[0], 16
        if kind == b"jp2c":
            return at + header
        if length < header:  # 0 (up to the end) before jp2c, or malformed
            break
        at += length
    raise DecodeError("JP2 file without a codestream box")


def _j2k_codestream(frame: bytes) -> Codestream:
    """Size, precision and decomposition levels from a J2K main header (SIZ, COD, COC)."""
    at = _jp2_codestream_at(frame) if frame.startswith(jpeg2000.JP2_SIGNATURE) else 0
    if frame[at : at + 4] != b"\xff\x4f\xff\x51":  # SOC, then SIZ
        raise DecodeError("JPEG 2000 frame without a SIZ marker")
    siz = at + 2
    _, _, xsiz, ysiz, xosiz, yosiz, _, _, _, _, csiz = struct.unpack_from(">HHHIIIIIIIIH", frame, siz)[1:]
    ssiz, xr, yr = struct.unpack_from(">BBB", frame, siz + 40)
    if csiz < 1 or xsiz <= xosiz or ysiz <= yosiz or xr != 1 or yr != 1:
        raise DecodeError("JPEG 2000 frame with an unsupported SIZ marker")
    levels: int | None = None
    at = siz + 2 + _u16(frame, siz + 2)
    while at + 4 <= len(frame):  # the main header's marker segments, up to the first tile (SOT)
        marker, length = _u16(frame, at), _u16(frame, at + 2)
        if marker == 0xFF90 or length < 2:
            break
        if marker == 0xFF52:  # COD: Scod, progression, layers (2), MCT, then levels
            levels = frame[at + 9] if levels is None else min(levels, frame[at + 9])
        elif marker == 0xFF53:  # COC: a component's own levels
            skip = 2 if csiz >= 257 else 1
            value = frame[at + 5 + skip]
            levels = value if levels is None else min(levels, value)
        at += 2 + length
    return Codestream(ysiz - yosiz, xsiz - xosiz, csiz, (ssiz & 0x7F) + 1, bool(ssiz & 0x80), levels or 0)


def _jpeg_codestream(frame: bytes) -> Codestream:
    """Size and precision from a JPEG (or JPEG-LS) frame's SOF marker."""
    at = 2 if frame[:2] == b"\xff\xd8" else -1
    while 0 <= at < len(frame) - 9:
        if frame[at] != 0xFF:
            break
        marker = frame[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            at += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            break
        if marker in _SOF:
            precision, rows, columns, components = struct.unpack_from(">BHHB", frame, at + 4)
            if rows == 0:  # height given later by a DNL marker: the size cannot be bounded first
                raise DecodeError("JPEG frame without its height in the SOF marker")
            return Codestream(rows, columns, components, precision)
        at += 2 + _u16(frame, at + 2)
    raise DecodeError("JPEG frame without a SOF marker")


_FRAME_HEADERS = _JPEG_2000 | _JPEG | _JPEG_LS
"""Syntaxes whose frames carry their own size (RLE writes into a buffer of the header's size)."""


def codestream(syntax: str, frame: bytes) -> Codestream:
    """What a compressed frame of a syntax in :data:`_FRAME_HEADERS` says it decodes to.

    Raises:
        DecodeError: a frame whose header is missing or cannot be read.
    """
    try:
        return _j2k_codestream(frame) if syntax in _JPEG_2000 else _jpeg_codestream(frame)
    except (struct.error, IndexError):
        raise DecodeError("compressed frame with a truncated header") from None


def _header_int(ds: pydicom.Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None:
        raise DecodeError(f"DICOM header without {keyword}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise DecodeError(f"DICOM header with a bad {keyword}") from None
    if number < 0:
        raise DecodeError(f"DICOM header with a bad {keyword}")
    return number


@dataclass(frozen=True)
class _Frame:
    rows: int
    columns: int
    samples: int
    frames: int
    syntax: str
    first: tuple[Codestream, bytes] | None
    """The first frame's codestream header and bytes (compressed syntaxes only)."""


def _checked(ds: pydicom.Dataset, max_bytes: int) -> _Frame:
    """The header's image size, checked against ``max_bytes`` and every frame's codestream."""
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    samples = _header_int(ds, "SamplesPerPixel", 1)
    frames = _header_int(ds, "NumberOfFrames", 1) or 1
    allocated = _header_int(ds, "BitsAllocated", 16)
    if "PixelData" not in ds:
        raise DecodeError("DICOM without pixel data")
    if rows == 0 or columns == 0 or samples == 0:
        raise DecodeError("DICOM header with an empty image size")
    declared = rows * columns * samples * frames * max(1, -(-allocated // 8))
    if declared > max_bytes:
        raise DecodeError(f"decoded image would take {declared} bytes, over the limit of {max_bytes}")
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    first: tuple[Codestream, bytes] | None = None
    if syntax in _FRAME_HEADERS:
        try:
            parts = list(generate_frames(ds.PixelData, number_of_frames=frames))
        except Exception as exc:
            raise DecodeError(f"cannot split the compressed frames ({type(exc).__name__})") from None
        if len(parts) != frames:
            raise DecodeError(f"the header declares {frames} frames, the pixel data holds {len(parts)}")
        for part in parts:
            stream = codestream(syntax, part)
            if (stream.rows, stream.columns) != (rows, columns) or stream.components != samples:
                raise DecodeError(
                    f"the compressed frame is {stream.columns}x{stream.rows}x{stream.components}, "
                    f"the header declares {columns}x{rows}x{samples}"
                )
            if stream.precision > max(allocated, 8):
                raise DecodeError(
                    f"the compressed frame holds {stream.precision}-bit samples, "
                    f"the header allocates {allocated} bits"
                )
            if first is None:
                first = stream, part
    return _Frame(rows, columns, samples, frames, syntax, first)


def read_dicom(data: bytes) -> pydicom.Dataset:
    """Parse a DICOM file without decoding its pixels (their bytes are read, not decoded).

    Raises:
        DecodeError: any failure of the parser, with its type only.
    """
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        for _element in ds:  # values convert lazily; force it here, inside the boundary
            pass
        return ds
    except Exception as exc:  # the parser raises anything: ValueError, struct.error...
        raise DecodeError(f"cannot read DICOM ({type(exc).__name__})") from None


def _halvings(short: int, min_side: int, most: int) -> int:
    """How many times a side of ``short`` pixels can be halved (rounding up) and stay
    >= ``min_side``, at most ``most`` times."""
    count = 0
    while count < most and min_side > 0 and -(-short // (2 ** (count + 1))) >= min_side:
        count += 1
    return count


def _area_shrink(pixels: np.ndarray, min_side: int) -> np.ndarray:
    """Average ``k x k`` blocks (the largest k keeping the short side >= ``min_side``).

    A box filter over whole blocks: every source pixel counts once, so no aliasing, and the
    model's resize then has a few percent left to do. Up to ``k - 1`` edge rows or columns
    are dropped (under half a percent of the image at the sizes this is used on).
    """
    k = min(pixels.shape) // min_side if min_side > 0 else 1
    if k < 2:
        return pixels
    h, w = pixels.shape[0] // k, pixels.shape[1] // k
    rows = pixels[: h * k, : w * k].reshape(h, k, w * k).sum(axis=1, dtype=np.float32)
    shrunk: np.ndarray = rows.reshape(h, w, k).sum(axis=2) / np.float32(k * k)
    return shrunk


def _j2k_reduced(frame: bytes, stream: Codestream, min_side: int) -> np.ndarray:
    """A grey J2K frame decoded at the lowest resolution level still >= ``min_side``
    (OpenJPEG's ``reduce``: the discarded levels are never decoded), in OpenJPEG's threads."""
    level = _halvings(min(stream.rows, stream.columns), min_side, stream.levels)
    return jpeg2000.decode(frame, level)


def _jpeg_scaled(frame: bytes, stream: Codestream, min_side: int) -> np.ndarray:
    """A grey 8-bit JPEG frame decoded at 1/2, 1/4 or 1/8 scale in the DCT (libjpeg's scaling).

    Scaled to twice ``min_side``, not to ``min_side``: a scaled IDCT drops the high
    frequencies without smoothing, and the last halving moved the bundled model's score on the
    real 1024 px test radiographs by up to 0.015 (one step less: 0.005; J2K's wavelet and the
    block average stay under 0.003 at ``min_side`` itself).
    """
    scale = 2 ** _halvings(min(stream.rows, stream.columns), 2 * min_side, 3)
    image = Image.open(io.BytesIO(frame), formats=["JPEG"])
    if scale > 1:
        image.draft(None, (stream.columns // scale, stream.rows // scale))
    image.load()
    return np.asarray(image)


def dicom_pixels(ds: pydicom.Dataset, *, min_side: int = 0, max_bytes: int = MAX_DECODED_BYTES) -> np.ndarray:
    """Decode a parsed DICOM's pixels, bounded by ``max_bytes`` before any decoder runs.

    The bound is checked on the header and on every compressed frame's own header (JPEG SOF,
    J2K SIZ): a codestream that disagrees with the DICOM header is refused, not decoded.

    Args:
        ds: from :func:`read_dicom`.
        min_side: for a single-frame grey image, decode at the smallest size whose short side
            is still >= ``min_side``: JPEG 2000 at a reduced resolution level, 8-bit JPEG with
            DCT scaling, other syntaxes at full size then averaged over blocks. 0: full size
            (and every frame, as ``ds.pixel_array``).
        max_bytes: bound on the full-size decoded image.

    Raises:
        DecodeError: over the bound, header and codestream disagree, or the decoder fails.
    """
    frame = _checked(ds, max_bytes)
    single_grey = min_side > 0 and frame.frames == 1 and frame.samples == 1
    try:
        if single_grey and frame.first is not None:
            stream, part = frame.first
            signed = bool(ds.get("PixelRepresentation", 0))
            if frame.syntax in _JPEG_2000 and jpeg2000.AVAILABLE and stream.signed == signed:
                return _j2k_reduced(part, stream, min_side)
            if frame.syntax == JPEGBaseline8Bit and stream.precision == 8:
                return _jpeg_scaled(part, stream, min_side)
        if frame.syntax in _JPEG_LS:
            ds.pixel_array_options(decoding_plugin="pyjpegls")  # CharLS: 3-4x libjpeg's JPEG-LS
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise anything: ValueError, RuntimeError, OSError...
        raise DecodeError(f"cannot decode DICOM pixels ({type(exc).__name__})") from None
    return _area_shrink(pixels, min_side) if single_grey else pixels


def decode_dicom(
    data: bytes, *, min_side: int = 0, max_bytes: int = MAX_DECODED_BYTES
) -> tuple[pydicom.Dataset, np.ndarray]:
    """Parse a DICOM file and decode its pixels (see :func:`dicom_pixels` for the arguments).

    Raises:
        DecodeError: any failure of the parser or the pixel decoders, with its type only.
    """
    ds = read_dicom(data)
    return ds, dicom_pixels(ds, min_side=min_side, max_bytes=max_bytes)


def open_picture(
    data: bytes,
    formats: tuple[str, ...] = ("PNG", "JPEG"),
    *,
    min_side: int = 0,
    max_bytes: int = MAX_DECODED_BYTES,
) -> Image.Image:
    """Open and fully load a PNG/JPEG, bounded by ``max_bytes`` (from the picture's own header,
    before decoding) and by PIL's decompression-bomb warning, treated as an error.

    Args:
        min_side: decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT while its short side stays
            >= ``2 * min_side`` (see :func:`_jpeg_scaled`; 0: full size). PNG has no reduced decoding.

    Raises:
        DecodeError: unreadable, truncated, over the bound or bomb-sized pictures.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(formats))
            width, height = image.size
            depth = 2 if "16" in image.mode else 4 if image.mode in ("I", "F") else 1
            decoded = width * height * len(image.getbands()) * depth
            if decoded > max_bytes:
                raise DecodeError(
                    f"decoded picture would take {decoded} bytes, over the limit of {max_bytes}"
                )
            scale = 2 ** _halvings(min(width, height), 2 * min_side, 3)  # as _jpeg_scaled
            if scale > 1 and image.format == "JPEG":
                image.draft(None, (width // scale, height // scale))
            image.load()
        return image
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"cannot decode picture ({type(exc).__name__})") from None


def decode_gray(
    data: bytes, pre: Preprocessing, *, dicom: bool, max_bytes: int = MAX_DECODED_BYTES
) -> np.ndarray:
    """Stored bytes -> ``[0, 1]`` grey image at the resolution the model needs.

    What training and serving both decode with (the service calls the same
    :func:`decode_dicom` and :func:`open_picture`, with a gate between decoding and
    windowing): each codec is asked for the smallest size whose short side is still
    >= ``pre.input_size``, then :func:`to_input` resizes.

    Raises:
        DecodeError: undecodable, over ``max_bytes``, or not a single grey frame.
    """
    if not dicom:
        return gray_from_image(open_picture(data, min_side=pre.input_size, max_bytes=max_bytes), pre)
    ds, pixels = decode_dicom(data, min_side=pre.input_size, max_bytes=max_bytes)
    try:
        return gray_from_dicom(ds, pixels, pre)
    except (ValueError, TypeError) as exc:
        raise DecodeError(f"cannot window DICOM pixels ({type(exc).__name__})") from None


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
