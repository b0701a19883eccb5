"""The tiny plumbing bundle: a real timm network with seeded random weights at 64 px.

Tests and benches that need a served model but not an accurate one build it here, so that
every copy has the same card fields (and a change to the card format is made once).
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.bundle import create_network, save_bundle
from models.preprocess import Preprocessing

PLUMBING_THRESHOLDS = {"critical": 0.9, "elevated": 0.5}


def save_tiny_bundle(
    path: Path,
    *,
    name: str = "tiny-test",
    thresholds: dict[str, float] | None = None,
    seed: int = 0,
    summary: str = "plumbing tests only",
    age_bands: tuple[str, ...] = (),
) -> Path:
    """Write the tiny bundle to ``path`` and return it; ``thresholds`` default to 0.9/0.5;
    ``age_bands``: the card's intended ages (none: any age)."""
    torch.manual_seed(seed)
    save_bundle(
        path,
        {
            "name": name,
            "version": "0.0.1",
            "architecture": "tf_efficientnet_lite0",
            "labels": ("normal", "pneumonia"),
            "positive_label": "pneumonia",
            "preprocessing": Preprocessing(input_size=64),
            "thresholds": thresholds or PLUMBING_THRESHOLDS,
            "intended_use": {"summary": summary, "age_bands": age_bands},
        },
        create_network("tf_efficientnet_lite0", num_classes=2).state_dict(),
    )
    return path
