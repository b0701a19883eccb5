"""Fixtures for the ML tests: the shipped samples and the default bundle (no shared corpus needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.bundle import Bundle, load_bundle
from models.data import Sample, list_folder

MODELS_DATA = Path(__file__).parent / "data"
TESTS_DATA = Path(__file__).parents[1] / "data"
DEFAULT_BUNDLE = Path(__file__).parents[2] / "models" / "bundles" / "cxr-pneumonia"
LABELS = ("normal", "pneumonia")


@pytest.fixture(scope="session")
def samples() -> list[Sample]:
    """Four pediatric radiographs of held-out test patients: 2 normal, 2 pneumonia."""
    return list_folder(MODELS_DATA, LABELS)


@pytest.fixture(scope="session")
def default_bundle_dir() -> Path:
    """The committed default bundle's folder."""
    return DEFAULT_BUNDLE


@pytest.fixture(scope="session")
def default_bundle() -> Bundle:
    """The committed default bundle, loaded on CPU."""
    return load_bundle(DEFAULT_BUNDLE)


@pytest.fixture(scope="session")
def chest_dicom() -> Path:
    """A real CR chest PA (JPEG baseline, 1024 px), shipped in ``tests/data``."""
    return TESTS_DATA / "cr_chest_pa_jpeg_baseline_siim.dcm"
