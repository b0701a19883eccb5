"""Grad-CAM heat maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.bundle import Bundle, load_bundle
from models.data import Sample, load_gray
from models.explain import gradcam
from models.preprocess import to_input


def test_heatmap_shape_and_range(tiny_bundle: Path, samples: list[Sample]) -> None:
    bundle = load_bundle(tiny_bundle)
    pre = bundle.card.preprocessing
    heat = gradcam(bundle, to_input(load_gray(samples[0].path, pre), pre))
    assert heat.shape == (pre.input_size, pre.input_size)
    assert heat.dtype == np.float32 and heat.min() >= 0.0 and heat.max() <= 1.0


def test_heatmap_of_a_pneumonia_case_is_inside_the_image(
    default_bundle: Bundle, samples: list[Sample]
) -> None:
    pre = default_bundle.card.preprocessing
    pneumonia = next(s for s in samples if s.label == 1)
    heat = gradcam(default_bundle, to_input(load_gray(pneumonia.path, pre), pre))
    assert heat.max() == pytest.approx(1.0)
    # Evidence should sit in the chest, not in the outer border of the picture.
    border = np.ones_like(heat, dtype=bool)
    border[20:-20, 20:-20] = False
    assert heat[~border].mean() > heat[border].mean()


def test_heatmap_refuses_a_batch(tiny_bundle: Path) -> None:
    with pytest.raises(ValueError):
        gradcam(load_bundle(tiny_bundle), np.zeros((1, 3, 64, 64), dtype=np.float32))


def test_border_share_of_hand_made_maps() -> None:
    from models.ablation import border_share

    uniform = np.ones((64, 64), dtype=np.float32)
    assert border_share(uniform) == pytest.approx(1 - 0.75**2)  # the band is 44 % of the area
    centre = np.zeros((64, 64), dtype=np.float32)
    centre[24:40, 24:40] = 1.0
    assert border_share(centre) == 0.0
    edge = np.zeros((64, 64), dtype=np.float32)
    edge[:, 60:] = 1.0  # a bright strip at the right border, where 1.0.0's map peaked
    assert border_share(edge) == 1.0
    assert border_share(np.zeros((8, 8), dtype=np.float32)) == 0.0
