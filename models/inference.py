"""Inference-only rewrites of a loaded network: same outputs, less work per image.

Two rewrites, each found by tracing one forward pass and kept only if the rewritten
network gives the original's logits on random inputs (:func:`prepare`):

- **Batch norm folded into the convolution before it.** In eval mode a batch norm is an
  affine map per channel, so ``bn(conv(x))`` is one convolution with scaled weights and a
  bias. timm's ``BatchNormAct2d`` keeps its activation as a separate module.
- **TensorFlow "same" padding without a padded copy.** timm's ``Conv2dSame`` (the ``tf_``
  EfficientNets) pads its input with ``F.pad`` before every strided convolution: an extra
  full copy of the feature map, which on CPU took a sixth of the default network's forward
  pass. For the input size the bundle is served at, the same result is a convolution with
  symmetric zero padding, cropped: window ``j`` of a convolution padded by ``p`` starts at
  ``s*j - p``, and "same" wants ``s*i - top``; with ``p >= bottom`` and ``p - top`` a
  multiple of ``s`` the two agree for ``j = i + (p - top) / s``.

Training never sees these rewrites; they are applied by :func:`models.bundle.load_bundle`,
the folding only when the network runs in fp32 (see :func:`rewrite`).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

log = logging.getLogger("triage.models")

TOLERANCE = 1e-3
"""Largest logit difference (relative to the logits' scale) a rewrite may cause."""


def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow "same" padding ``(before, after)`` of one dimension (timm's ``pad_same``)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _crop_pad(before: int, after: int, stride: int) -> tuple[int, int]:
    """``(padding, offset)``: symmetric padding and output rows to drop so that the
    convolution's windows start where padding ``(before, after)`` puts them."""
    padding = before + stride * math.ceil(max(after - before, 0) / stride)
    return padding, (padding - before) // stride


class CroppedSameConv(nn.Conv2d):
    """A ``Conv2dSame`` for one input size: symmetric padding in the convolution, then a crop.

    Any other input size takes the original pad-then-convolve path.
    """

    def __init__(self, conv: nn.Conv2d, height: int, width: int) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            0,
            conv.dilation,  # type: ignore[arg-type]
            conv.groups,
            conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.weight, self.bias = conv.weight, conv.bias
        self.size = (height, width)
        (ph, oh), (pw, ow) = (
            _crop_pad(*_same_pads(n, k, s, d), s)
            for n, k, s, d in zip(self.size, conv.kernel_size, conv.stride, conv.dilation, strict=True)
        )
        self.crop_padding = (ph, pw)
        self.crop = (oh, ow, math.ceil(height / conv.stride[0]), math.ceil(width / conv.stride[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            pads = [
                _same_pads(n, k, s, d)
                for n, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True)
            ]
            x = nn.functional.pad(x, (*pads[1], *pads[0]))
            padded: torch.Tensor = self._conv_forward(x, self.weight, self.bias)
            return padded
        out = nn.functional.conv2d(
            x, self.weight, self.bias, self.stride, self.crop_padding, self.dilation, self.groups
        )
        top, left, height, width = self.crop
        return out[:, :, top : top + height, left : left + width]


Pairs = list[tuple[str, str]]


def _trace(network: nn.Module, inputs: torch.Tensor) -> tuple[Pairs, dict[str, tuple[int, int]]]:
    """Run one forward pass and return (conv, batch norm) pairs where the norm's input is
    the convolution's output, and the input size of every "same"-padded convolution."""
    from timm.layers.conv2d_same import Conv2dSame

    produced: dict[int, tuple[str, torch.Tensor]] = {}  # tensors kept alive so ids stay unique
    pairs: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    handles = []

    def on_conv(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            produced[id(output)] = (name, output)
            if isinstance(module, Conv2dSame):
                sizes[name] = (int(args[0].shape[-2]), int(args[0].shape[-1]))

        return hook

    def on_norm(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            source = produced.get(id(args[0]))
            if source is not None and source[1] is args[0]:
                pairs.append((source[0], name))

        return hook

    for name, module in network.named_modules():
        if type(module) in (nn.Conv2d, Conv2dSame):
            handles.append(module.register_forward_hook(on_conv(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(on_norm(name)))
    try:
        with torch.no_grad():
            network(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return pairs, sizes


def _set(network: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, leaf, module)


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What is left of a batch norm once folded: timm's ``BatchNormAct2d`` keeps its activation."""
    rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
    rest = [m for m in rest if not isinstance(m, nn.Identity | nn.Dropout)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def rewrite(network: nn.Module, input_size: int, *, fold_norms: bool = True) -> tuple[nn.Module, int, int]:
    """A rewritten copy of an eval-mode ``network`` for ``(N, 3, input_size, input_size)`` inputs.

    Args:
        network: the network as trained.
        input_size: the square input size it is served at.
        fold_norms: fold batch norms into convolutions. Only for fp32 inference: under
            bf16 autocast a folded convolution adds the norm's shift at bf16's precision,
            where the separate norm runs in fp32 (measured on a real radiograph of
            tests/models/data: a score moved 0.25 -> 0.34 folded, -> 0.26 not folded).

    Returns:
        ``(copy, norms folded, same-padded convolutions replaced)``; not yet checked.
    """
    network = copy.deepcopy(network).eval()
    parameter = next(network.parameters())
    probe = torch.zeros((1, 3, input_size, input_size), device=parameter.device, dtype=parameter.dtype)
    pairs, sizes = _trace(network, probe)
    folded = 0
    for conv_name, norm_name in pairs if fold_norms else []:
        conv, norm = network.get_submodule(conv_name), network.get_submodule(norm_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)
        if norm.running_mean is None or norm.running_var is None:
            continue  # normalises with batch statistics: not an affine map
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
        )
        _set(network, norm_name, _after_norm(norm))
        folded += 1
    for name, (height, width) in sizes.items():
        conv = network.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        _set(network, name, CroppedSameConv(conv, height, width))
    return network.eval(), folded, len(sizes)


def prepare(network: nn.Module, input_size: int, *, fold_norms: bool = True, batch: int = 2) -> nn.Module:
    """The rewritten network if it scores random inputs as ``network`` does, else ``network``.

    Args:
        network: an eval-mode network, already on its device and memory format.
        input_size: the square input size the bundle is served at.
        fold_norms: see :func:`rewrite` (False when the network runs under autocast).
        batch: images in the check.
    """
    try:
        fast, folded, cropped = rewrite(network, input_size, fold_norms=fold_norms)
    except Exception as exc:  # an architecture the tracing does not understand: serve it as is
        log.warning("inference rewrite skipped (%s)", type(exc).__name__)
        return network
    parameter = next(network.parameters())
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((batch, 3, input_size, input_size), generator=generator).to(
        parameter.device, memory_format=torch.channels_last
    )
    with torch.no_grad():
        want, got = network(inputs).float(), fast(inputs).float()
    error = float((want - got).abs().max()) / (1.0 + float(want.abs().max()))
    if not error <= TOLERANCE:
        log.warning("inference rewrite changed the logits (relative error %.2g); not used", error)
        return network
    log.info("inference rewrite: %d batch norms folded, %d same-padded convolutions cropped", folded, cropped)
    return fast
