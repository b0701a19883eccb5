"""Pictures for the viewer: the study as a display PNG and as full-depth grey values (the
viewer's own window/level), and the model's Grad-CAM heat map.

All are derived from the stored blob on demand. The heat map needs the model, loaded
lazily once per process (the first heat map pays for it); each case's map is cached as a
file next to its blob, named by the model version that made it. A study that cannot be
decoded is remembered by its blob's digest, so the routes do not decode it again on every
request.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from models.bundle import Bundle, load_bundle
from models.explain import gradcam
from models.preprocess import (
    DEEP_MODES,
    MAX_DECODED_BYTES,
    DecodeError,
    Preprocessing,
    decode_dicom,
    dicom_pixels,
    gray_from_dicom,
    gray_from_image,
    header_window,
    is_monochrome1,
    modality_values,
    open_picture,
    percentile_range,
    read_dicom,
    to_input,
)
from triage_api import golive
from triage_api.auth import Principal
from triage_api.blobs import blob_path, read_blob, write_atomically
from triage_api.cases import unblinded_case
from triage_api.errors import InvalidStudy, NotFound
from triage_api.ingest import DICOM
from triage_api.settings import Settings
from triage_api.tables import Case

MAX_DISPLAY_SIDE = 2048
"""Longest side of the display PNG: enough for a laptop screen, small enough to ship."""

_bundles: dict[tuple[str, str], Bundle] = {}
_bundles_lock = threading.Lock()


def explainer(settings: Settings) -> Bundle:
    """The site's bundle, loaded on first use and then kept for the life of the process."""
    key = (str(settings.model_path), settings.device)
    with _bundles_lock:
        if key not in _bundles:
            _bundles[key] = load_bundle(settings.model_path, settings.device)
        return _bundles[key]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=3)
    return out.getvalue()


T = TypeVar("T")


def _decoding(work: Callable[[], T]) -> T:
    """``work()``, where any failure to decode or read the study's pixels becomes
    :class:`InvalidStudy`."""
    try:
        return work()
    except (DecodeError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc) if isinstance(exc, DecodeError) else type(exc).__name__
        raise InvalidStudy(f"cannot display the study: {reason}") from None


def _first_frame(pixels: np.ndarray) -> np.ndarray:
    """A colour or multi-frame study (never scored) as one grey frame: its first, channels averaged."""
    first = pixels if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) else pixels[0]
    gray = np.asarray(first, dtype=np.float32)
    if gray.ndim == 3:
        gray = gray[..., :3].mean(axis=-1)
    return gray


def _gray(data: bytes, media_type: str, pre: Preprocessing, *, min_side: int, max_bytes: int) -> np.ndarray:
    """The study as a ``[0, 1]`` grey image, read the way the model reads it.

    Args:
        min_side: decode at the smallest size whose short side is still >= this (0: full size).
        max_bytes: bound on the full-size decoded image, checked before decoding.

    Raises:
        InvalidStudy: the pixels cannot be decoded.
    """

    def work() -> np.ndarray:
        if media_type != DICOM:
            return gray_from_image(open_picture(data, min_side=min_side, max_bytes=max_bytes), pre)
        ds, pixels = decode_dicom(data, min_side=min_side, max_bytes=max_bytes)
        if pixels.ndim == 2:
            return gray_from_dicom(ds, pixels, pre)
        # Colour or multi-frame (never scored): show the first frame as a plain picture.
        gray = _first_frame(pixels)
        span = float(gray.max() - gray.min()) or 1.0
        normalised: np.ndarray = (gray - float(gray.min())) / span
        return normalised

    return _decoding(work)


_UNDECODABLE_KEPT = 4096
_undecodable: OrderedDict[str, str] = OrderedDict()
_undecodable_lock = threading.Lock()


def _once(digest: str, render: Callable[[], T]) -> T:
    """``render()``, unless the study with this blob digest failed to decode before.

    A failed study is not decoded again on every request: a hostile one would cost its
    decoder's time and memory each time. The reason is kept (most recent 4096 studies,
    per process), so the answer is the same 422.
    """
    with _undecodable_lock:
        reason = _undecodable.get(digest)
    if reason is not None:
        raise InvalidStudy(reason)
    try:
        return render()
    except InvalidStudy as exc:
        with _undecodable_lock:
            _undecodable[digest] = str(exc)
            while len(_undecodable) > _UNDECODABLE_KEPT:
                _undecodable.popitem(last=False)
        raise


def display_png(data: bytes, media_type: str, max_bytes: int = MAX_DECODED_BYTES) -> bytes:
    """An 8-bit grey PNG of the study for the browser (which cannot show DICOM).

    DICOM goes through the same modality LUT, VOI window and MONOCHROME1 inversion as the
    model's input; the viewer's window/level then works on this picture, decoded at full
    size (a reader zooms in).

    Raises:
        InvalidStudy: the pixels cannot be decoded, or are over ``max_bytes``.
    """
    gray = _gray(data, media_type, Preprocessing(), min_side=0, max_bytes=max_bytes)
    image = Image.fromarray((np.clip(gray, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), mode="L")
    image.thumbnail((MAX_DISPLAY_SIDE, MAX_DISPLAY_SIDE), Image.Resampling.LANCZOS)
    return _png(image)


def _colour(cam: np.ndarray) -> Image.Image:
    """A heat colour ramp (black-red-yellow-white) whose opacity follows the heat."""
    v = np.clip(cam, 0.0, 1.0)
    rgba = np.stack(
        [np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1), 0.15 + 0.7 * v], axis=-1
    )
    rgba[..., 3] = np.where(v < 0.05, 0.0, rgba[..., 3])
    return Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), mode="RGBA")


def _heatmap_png(bundle: Bundle, data: bytes, media_type: str, max_bytes: int) -> bytes:
    """Grad-CAM on the model's own preprocessed input (decoded as for scoring), cropped back
    to the picture."""
    pre = bundle.card.preprocessing
    gray = _gray(data, media_type, pre, min_side=pre.input_size, max_bytes=max_bytes)
    cam = gradcam(bundle, to_input(gray, pre))
    if pre.resize != "stretch":  # drop the padding so the map lies over the picture itself
        h, w = gray.shape
        size = pre.input_size
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = (size - nh) // 2, (size - nw) // 2
        cam = cam[top : top + nh, left : left + nw]
    return _png(_colour(cam))


def heatmap_case(session: Session, *, principal: Principal, case_id: str) -> Case:
    """The scored case whose heat map the caller asks for; the access is audited (110103).

    Raises:
        NotFound: outside the caller's clinics, or no AI result.
        NotPermitted: the caller is this case's blinded appeal reader.
    """
    case = unblinded_case(session, principal, case_id)
    if not golive.shown_cases(session, [case]):
        raise NotFound("the case has no AI result to show, so no heat map")
    record(
        session,
        actor=principal.actor,
        action="case.heatmap",
        code=EventCode.ACCESS,
        object_type="case",
        object_id=case.id,
    )
    return case


def heatmap_png(case: Case, settings: Settings) -> bytes:
    """The case's Grad-CAM overlay as an RGBA PNG the size of the picture's aspect.

    Computed outside any transaction (it takes a forward and backward pass) and cached
    next to the blob under the model version that made it.

    Raises:
        InvalidStudy: the study cannot be decoded.
    """
    bundle = explainer(settings)
    source = blob_path(settings.blob_dir, case.sha256)
    cached = source.with_name(f"{case.sha256}.heatmap.{bundle.card.name}-{bundle.card.version}.png")
    if cached.exists():
        return cached.read_bytes()
    png = _once(
        case.sha256,
        lambda: _heatmap_png(
            bundle, read_blob(settings.blob_dir, case.sha256), case.media_type, settings.max_decoded_bytes
        ),
    )
    write_atomically(cached, png)
    return png


def image_case(session: Session, *, principal: Principal, case_id: str, original: bool = False) -> Case:
    """The case whose picture the caller may see unblinded; audited like the image route
    (``original``: the stored bytes, with the patient's identity, rather than pixels)."""
    case = unblinded_case(session, principal, case_id)
    record(
        session,
        actor=principal.actor,
        action="case.image",
        code=EventCode.ACCESS,
        object_type="case",
        object_id=case.id,
        details={"original": True} if original else None,
    )
    return case


def case_png(case: Case, settings: Settings) -> bytes:
    """The display PNG of ``case`` (see :func:`display_png`); a study that failed to decode
    before is answered from memory."""
    return _once(
        case.sha256,
        lambda: display_png(
            read_blob(settings.blob_dir, case.sha256), case.media_type, settings.max_decoded_bytes
        ),
    )


DISPLAY_PIXELS_SIDE = 1024
"""Longest side of the full-depth pixels the viewer windows itself: about a screen's worth."""


@dataclass(frozen=True)
class DisplayPixels:
    """A study's grey values at display resolution and full bit depth, for the viewer's
    window/level: pixels without identity (no header value but geometry and windows).

    ``values`` are the modality values (after Rescale Slope/Intercept), MONOCHROME1 inverted
    so that bright is dense, shifted (and, past 16 bits, scaled) into ``0 .. 2**bits - 1``;
    windows are in those units.
    """

    values: np.ndarray
    """``uint16``, rows x columns."""
    bits: int
    window: tuple[float, float]
    """Default (centre, width): the file's VOI window, else the model's percentile window."""
    window_from: str
    spacing_mm: tuple[float, float] | None
    """(row, column) spacing of the display pixels in mm, from the header's, scaled."""
    spacing_from: str | None

    def info(self) -> dict[str, object]:
        """Geometry, depth and windows, as the viewer reads them (the ``X-Pixel-Info`` header).

        The presets beside the default are relative to this image's grey-level range (a
        radiograph's values are not calibrated like CT's Hounsfield units): lung shows the dark
        low-density range, soft tissue the mediastinum's middle, bone the dense top.
        """
        pre = Preprocessing()
        lo, hi = percentile_range(self.values, pre.percentile_low, pre.percentile_high)
        span = max(hi - lo, 2.0)

        def window(center: float, width: float) -> list[float]:
            return [round(center, 1), round(max(width, 2.0), 1)]

        rows, columns = self.values.shape
        return {
            "width": columns,
            "height": rows,
            "bits": self.bits,
            "window": window(*self.window),
            "window_from": self.window_from,
            "presets": {
                "lung": window(lo + 0.35 * span, 0.7 * span),
                "soft": window(lo + 0.6 * span, 0.5 * span),
                "bone": window(lo + 0.85 * span, 0.35 * span),
            },
            "spacing_mm": [round(v, 6) for v in self.spacing_mm] if self.spacing_mm else None,
            "spacing_from": self.spacing_from,
        }

    def body(self) -> bytes:
        """The values as little-endian ``uint16``, row by row."""
        return self.values.astype("<u2").tobytes()


def _display_min_side(header: tuple[int, int]) -> int:
    """The short side at which a study of ``header`` (Rows, Columns) still fills
    :data:`DISPLAY_PIXELS_SIDE` on its long side: its decoding stops there (JPEG 2000
    resolution levels, JPEG DCT scaling, block averages), since the viewer never shows more.
    0 (full size) for a study no larger than that. The pixel spacing is then scaled from the
    header's size; block averaging may drop up to k - 1 edge rows, an error under 0.1 %."""
    longest, shortest = max(header), min(header)
    if longest <= DISPLAY_PIXELS_SIDE or shortest <= 0:
        return 0
    return math.ceil(shortest * DISPLAY_PIXELS_SIDE / longest)


def _shrink(values: np.ndarray) -> np.ndarray:
    """``values`` area-averaged (a box filter: every source pixel counts) to at most
    :data:`DISPLAY_PIXELS_SIDE` on the long side, as ``float32``."""
    rows, columns = values.shape
    longest = max(rows, columns)
    if longest <= DISPLAY_PIXELS_SIDE:
        return values.astype(np.float32)
    scale = DISPLAY_PIXELS_SIDE / longest
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    picture = Image.fromarray(values.astype(np.float32), mode="F")
    return np.asarray(picture.resize(size, Image.Resampling.BOX), dtype=np.float32)


def _modality_range(ds: object, values: np.ndarray) -> tuple[float, float]:
    """The range a frame's modality values can take (from Bits Stored and Pixel
    Representation through the modality LUT), widened to the values actually there."""
    lo, hi = float(values.min()), float(values.max())
    try:
        bits = int(getattr(ds, "BitsStored", None) or getattr(ds, "BitsAllocated", None) or 16)
        signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
    except (TypeError, ValueError):
        return lo, hi
    bits = max(1, min(bits, 32))
    stored = np.array(
        [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1], dtype=np.float64
    )
    ends = modality_values(ds, stored)
    return min(lo, float(ends.min())), max(hi, float(ends.max()))


def _spacing(
    ds: object, decoded: tuple[int, ...], shown: tuple[int, ...]
) -> tuple[tuple[float, float] | None, str | None]:
    """(row, column) mm between the shown pixels: Pixel Spacing (calibrated to the patient),
    else Imager Pixel Spacing (at the detector), scaled from the decoded to the shown size."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, column = (float(v) for v in getattr(ds, keyword, None) or ())
        except (TypeError, ValueError):
            continue
        if all(math.isfinite(v) and v > 0 for v in (row, column)):
            return (row * decoded[0] / shown[0], column * decoded[1] / shown[1]), keyword
    return None, None


def _packed(
    shown: np.ndarray,
    value_range: tuple[float, float],
    window: tuple[float, float] | None,
    window_from: str,
    *,
    invert: bool,
    spacing: tuple[tuple[float, float] | None, str | None] = (None, None),
) -> DisplayPixels:
    """Display values (and their window) moved into ``uint16``: inverted within
    ``value_range`` if asked, shifted to start at 0, scaled down only past 16 bits."""
    lo, hi = value_range
    if window is None:
        pre = Preprocessing()
        p_lo, p_hi = percentile_range(shown, pre.percentile_low, pre.percentile_high)
        window, window_from = ((p_lo + p_hi) / 2, max(p_hi - p_lo, 2.0)), "percentiles"
    center, width = window
    if invert:
        shown, center = lo + hi - shown, lo + hi - center
    unit = max(1.0, (hi - lo) / 65535.0)
    values = np.clip(np.rint((shown - lo) / unit), 0, 65535).astype(np.uint16)
    bits = max(1, min(16, math.ceil(math.log2((hi - lo) / unit + 1))))
    mm, source = spacing
    return DisplayPixels(values, bits, ((center - lo) / unit, width / unit), window_from, mm, source)


def display_pixels(data: bytes, media_type: str, max_bytes: int = MAX_DECODED_BYTES) -> DisplayPixels:
    """The study's full-depth grey values for the viewer's own window/level.

    DICOM: the modality LUT, then MONOCHROME1 inverted (the VOI window is left to the viewer;
    the file's first window is its default); an 8-bit PNG/JPEG keeps its 0..255 values
    (default window: all of them), a 16-bit PNG its 16 bits. Decoded through the same
    decoders as the model's input, at the smallest size that still fills the display
    (:func:`_display_min_side`), then area-averaged to display size.

    Raises:
        InvalidStudy: the pixels cannot be decoded, or are over ``max_bytes``.
    """

    def work() -> DisplayPixels:
        if media_type != DICOM:
            image = open_picture(data, max_bytes=max_bytes)
            if image.mode not in DEEP_MODES:
                grey = _shrink(np.asarray(image.convert("L"), dtype=np.float32))
                return _packed(grey, (0.0, 255.0), (128.0, 256.0), "full range", invert=False)
            values = np.asarray(image, dtype=np.float32)
            deep = (0.0, 65535.0) if "16" in image.mode else (float(values.min()), float(values.max()))
            return _packed(_shrink(values), deep, None, "percentiles", invert=False)
        ds = read_dicom(data)
        header = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0))
        pixels = dicom_pixels(ds, min_side=_display_min_side(header), max_bytes=max_bytes)
        if pixels.ndim != 2:  # colour or multi-frame (never scored): the first frame, plainly
            frame = _first_frame(pixels)
            shown = _shrink(frame)
            value_range = (float(frame.min()), float(frame.max()))
            return _packed(shown, value_range, None, "percentiles", invert=False)
        values = modality_values(ds, pixels)
        shown = _shrink(values)
        window = header_window(ds, shown)
        return _packed(
            shown,
            _modality_range(ds, values),
            window,
            "file",
            invert=is_monochrome1(ds),
            spacing=_spacing(ds, header, shown.shape),
        )

    return _decoding(work)


def case_pixels(case: Case, settings: Settings) -> DisplayPixels:
    """The full-depth display values of ``case`` (see :func:`display_pixels`); a study that
    failed to decode before is answered from memory."""
    return _once(
        case.sha256,
        lambda: display_pixels(
            read_blob(settings.blob_dir, case.sha256), case.media_type, settings.max_decoded_bytes
        ),
    )
