"""Studies made up for tests whose expected pixels, windows and sizes are known exactly."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

RAMP_COLUMNS, RAMP_ROWS = 2048, 1024
RAMP_SPACING = (0.2, 0.25)
"""(row, column) Pixel Spacing in mm of :func:`ramp_dicom`; the viewer gets half the columns
and rows, so twice these."""


def ramp_values() -> np.ndarray:
    """12-bit values rising from 0 at the left edge to 4095 at the right, equal down each column."""
    column = np.arange(RAMP_COLUMNS, dtype=np.int64) * 4095 // (RAMP_COLUMNS - 1)
    return np.broadcast_to(column, (RAMP_ROWS, RAMP_COLUMNS)).astype(np.uint16)


def ramp_dicom(
    *, photometric: str = "MONOCHROME2", window: tuple[float, float] | None = (2000, 3000)
) -> bytes:
    """An uncompressed 12-bit chest CR of :func:`ramp_values` with Pixel Spacing
    :data:`RAMP_SPACING` and, unless None, the VOI window (centre, width)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = RAMP_ROWS, RAMP_COLUMNS
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(RAMP_SPACING)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = ramp_values().tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()
