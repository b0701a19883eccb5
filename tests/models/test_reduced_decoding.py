"""Fidelity of decoding at the model's resolution: the bundled model scores real radiographs
decoded at a reduced size as it scores them decoded at full size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import Bundle, load_bundle
from models.preprocess import decode_dicom, gray_from_dicom, to_input
from tests.conftest import shared_data

TESTS_DATA = Path(__file__).parents[1] / "data"
SHARED_CHEST = (
    "cr_chest_pa_j2k_lossy_RG1_J2KI.dcm",  # 1955x1841, JPEG 2000 lossy
    "dx_chest_pa_j2k_lossless_966_fixed.dcm",  # 2128x2000, JPEG 2000 lossless
    "cr_chest_pa_jpegls_nearlossless_RG1_JLSN.dcm",  # 1955x1841, JPEG-LS (block average)
    "cr_chest_pa_jpeg_baseline_siim.dcm",  # 1024², JPEG baseline (DCT scaling)
    "cr_chest_pa_monochrome1_siim.dcm",
)


@pytest.mark.parametrize("name", SHARED_CHEST)
def test_reduced_decoding_scores_the_shared_radiographs_as_full_decoding(
    fidelity_bundle: Bundle, name: str
) -> None:
    check(fidelity_bundle, shared_data("dicom", "chest", name))


@pytest.mark.parametrize("name", sorted(p.name for p in TESTS_DATA.glob("*.dcm")))
def test_reduced_decoding_scores_the_shipped_radiographs_as_full_decoding(
    fidelity_bundle: Bundle, name: str
) -> None:
    check(fidelity_bundle, TESTS_DATA / name)


@pytest.fixture(scope="module")
def fidelity_bundle() -> Bundle:
    """cxr-pneumonia-lite0@1.0.0, whose scores the 0.02 bound was set on. The default
    cxr-pneumonia@2.1.0 (temperature 0.48) moves by up to 0.028 here, 2.0.0 (0.33) by 0.047:
    recorded in docs/benchmarks.md as an open gap."""
    return load_bundle(Path(__file__).parents[2] / "models" / "bundles" / "cxr-pneumonia-lite0")


def check(bundle: Bundle, path: Path) -> None:
    pre = bundle.card.preprocessing
    data = path.read_bytes()
    ds, full = decode_dicom(data)
    _, reduced = decode_dicom(data, min_side=pre.input_size)
    if min(full.shape) >= 4 * pre.input_size:  # large enough to be decoded at a smaller size
        assert reduced.size * 4 <= full.size
    assert min(reduced.shape) >= min(pre.input_size, min(full.shape))
    scores = bundle.predict(
        np.stack([to_input(gray_from_dicom(ds, pixels, pre), pre) for pixels in (full, reduced)])
    )
    assert abs(float(scores[0] - scores[1])) <= 0.02
