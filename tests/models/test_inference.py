"""The inference rewrites give the trained network's scores, or are not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from models.bundle import load_bundle
from models.data import Sample, load_gray
from models.inference import CroppedSameConv, prepare, rewrite
from models.preprocess import to_input


def _inputs(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn((batch, 3, size, size), generator=generator)
    return inputs.contiguous(memory_format=torch.channels_last)


def test_default_bundle_is_served_rewritten_with_the_same_scores(default_bundle_dir: Path) -> None:
    plain = load_bundle(default_bundle_dir, rewrite=False)
    fast = load_bundle(default_bundle_dir)
    kinds = {type(m) for m in fast.network.modules()}
    assert not any(issubclass(kind, nn.BatchNorm2d) for kind in kinds)
    assert Conv2dSame not in kinds and CroppedSameConv in kinds
    batch = _inputs(5, fast.card.preprocessing.input_size).numpy()
    assert fast.predict(batch) == pytest.approx(plain.predict(batch), abs=1e-5)


def test_rewrite_counts_and_other_input_sizes(default_bundle_dir: Path) -> None:
    plain = load_bundle(default_bundle_dir, rewrite=False).network
    fast, folded, cropped = rewrite(plain, 224)
    # Two EfficientNet-Lite0 members: every convolution has its batch norm (49 a network);
    # five strided "same" convolutions a network.
    assert folded == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 2 * 49
    assert cropped == 2 * 5
    with torch.no_grad():
        for size in (224, 161):  # 161: not the served size, the convolutions pad as before
            x = _inputs(2, size)
            torch.testing.assert_close(fast(x), plain(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation"),
    [
        (224, 3, 2, 1),
        (224, 5, 2, 1),
        (113, 3, 2, 1),
        (57, 5, 2, 1),
        (40, 3, 2, 2),
        (30, 7, 3, 1),
        (31, 3, 1, 1),
    ],
)
def test_cropped_convolution_equals_tensorflow_same_padding(
    size: int, kernel: int, stride: int, dilation: int
) -> None:
    torch.manual_seed(0)
    same = Conv2dSame(6, 6, kernel, stride=stride, dilation=dilation, groups=3, bias=True).eval()
    cropped = CroppedSameConv(same, size, size + 1).eval()
    x = torch.randn(2, 6, size, size + 1)
    with torch.no_grad():
        torch.testing.assert_close(cropped(x), same(x), atol=1e-5, rtol=1e-5)


class _RawReused(nn.Module):
    """A convolution whose output feeds its batch norm and, raw, a skip connection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head((self.bn(y) + y).mean(dim=(2, 3)))


def test_a_rewrite_that_changes_the_scores_is_not_used() -> None:
    torch.manual_seed(0)
    network = _RawReused().eval()
    with torch.no_grad():
        network.bn.running_mean.uniform_(-1, 1)
        network.bn.running_var.uniform_(0.5, 2)
        network.bn.weight.uniform_(0.5, 2)
    folded, _, _ = rewrite(network, 16)
    x = _inputs(2, 16)
    with torch.no_grad():
        assert not torch.allclose(folded(x), network(x), atol=1e-3)  # folding this one is wrong
    assert prepare(network, 16) is network


def test_bf16_autocast_runs_the_rewritten_network(default_bundle_dir: Path, samples: list[Sample]) -> None:
    """The CUDA path's autocast, exercised on CPU on real radiographs: the rewritten
    convolutions take bf16 and the scores stay within bf16's error."""
    fp32 = load_bundle(default_bundle_dir)
    bf16 = load_bundle(default_bundle_dir, amp=True)
    assert bf16.amp and not fp32.amp
    kinds = {type(m) for m in bf16.network.modules()}
    # Padding is exact in any precision; the norms stay unfolded (see models.inference.rewrite).
    assert CroppedSameConv in kinds and any(issubclass(kind, nn.BatchNorm2d) for kind in kinds)
    pre = fp32.card.preprocessing
    batch = np.stack([to_input(load_gray(sample.path, pre), pre) for sample in samples])
    want, got = fp32.predict(batch), bf16.predict(batch)
    assert want.min() < 0.5 < want.max()  # both classes: the scores are not saturated alike
    # bf16's logit error reaches the score divided by the temperature (2.1.0: T = 0.48): a
    # mid-range score moves by up to ~0.07 (measured; 2.0.0: 0.021), which is why amp is
    # opt-in. Scores near 0 or 1 barely move.
    assert got == pytest.approx(want, abs=0.1)
    assert not load_bundle(default_bundle_dir).amp
