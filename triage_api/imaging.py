"""Pictures for the viewer: the study as a display PNG, and the model's Grad-CAM heat map.

Both are derived from the stored blob on demand. The heat map needs the model, loaded
lazily once per process (the first heat map pays for it); each case's map is cached as a
file next to its blob, named by the model version that made it. A study that cannot be
decoded is remembered by its blob's digest, so the routes do not decode it again on every
request.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session

from audit.log import EventCode, record
from models.bundle import Bundle, load_bundle
from models.explain import gradcam
from models.preprocess import (
    MAX_DECODED_BYTES,
    DecodeError,
    Preprocessing,
    decode_dicom,
    gray_from_dicom,
    gray_from_image,
    open_picture,
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


def _gray(data: bytes, media_type: str, pre: Preprocessing, *, min_side: int, max_bytes: int) -> np.ndarray:
    """The study as a ``[0, 1]`` grey image, read the way the model reads it.

    Args:
        min_side: decode at the smallest size whose short side is still >= this (0: full size).
        max_bytes: bound on the full-size decoded image, checked before decoding.

    Raises:
        InvalidStudy: the pixels cannot be decoded.
    """
    try:
        if media_type != DICOM:
            return gray_from_image(open_picture(data, min_side=min_side, max_bytes=max_bytes), pre)
        ds, pixels = decode_dicom(data, min_side=min_side, max_bytes=max_bytes)
        if pixels.ndim == 2:
            return gray_from_dicom(ds, pixels, pre)
        # Colour or multi-frame (never scored): show the first frame as a plain picture.
        first = pixels if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) else pixels[0]
        gray = np.asarray(first, dtype=np.float32)
        if gray.ndim == 3:
            gray = gray[..., :3].mean(axis=-1)
        span = float(gray.max() - gray.min()) or 1.0
        return (gray - float(gray.min())) / span
    except (DecodeError, ValueError, TypeError, IndexError) as exc:
        reason = str(exc) if isinstance(exc, DecodeError) else type(exc).__name__
        raise InvalidStudy(f"cannot display the study: {reason}") from None


_UNDECODABLE_KEPT = 4096
_undecodable: OrderedDict[str, str] = OrderedDict()
_undecodable_lock = threading.Lock()


def _once(digest: str, render: Callable[[], bytes]) -> bytes:
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
