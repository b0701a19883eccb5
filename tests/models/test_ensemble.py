"""Ensemble bundles: every member verified, one batched forward pass, deterministic scores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import (
    BundleError,
    ChecksumMismatch,
    Ensemble,
    create_network,
    load_bundle,
    member_file,
    save_bundle,
    verify_bundle,
)
from models.preprocess import Preprocessing

FIELDS = {
    "name": "tiny-ensemble",
    "version": "0.0.1",
    "architecture": "tf_efficientnet_lite0",
    "labels": ("normal", "pneumonia"),
    "positive_label": "pneumonia",
    "preprocessing": Preprocessing(input_size=64),
    "thresholds": {"critical": 0.9, "elevated": 0.5},
    "intended_use": {"summary": "plumbing tests only"},
}


def _states(count: int) -> list[dict[str, torch.Tensor]]:
    states = []
    for seed in range(count):
        torch.manual_seed(seed)
        states.append(create_network("tf_efficientnet_lite0", num_classes=2).state_dict())
    return states


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ensemble") / "bundle"
    save_bundle(path, {**FIELDS, "tta": "hflip"}, _states(2))
    return path


def _batch(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def test_card_lists_every_member_with_its_checksum(ensemble_dir: Path) -> None:
    card = verify_bundle(ensemble_dir)
    assert (
        [m.file for m in card.members]
        == [member_file(0), member_file(1)]
        == [
            "weights.safetensors",
            "weights-1.safetensors",
        ]
    )
    assert card.members[0].sha256 == card.weights_sha256 and card.members[0].sha256 != card.members[1].sha256
    assert card.tta == "hflip"


@pytest.mark.parametrize("file", ["weights.safetensors", "weights-1.safetensors"])
def test_a_tampered_member_refuses_the_bundle(ensemble_dir: Path, tmp_path: Path, file: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ensemble_dir, copy)
    with (copy / file).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ChecksumMismatch):
        load_bundle(copy)


def test_a_missing_member_or_a_forged_first_member_is_refused(ensemble_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ensemble_dir, copy)
    (copy / "weights-1.safetensors").unlink()
    with pytest.raises(BundleError, match="no weights-1.safetensors"):
        verify_bundle(copy)
    card = json.loads((ensemble_dir / "card.json").read_text())
    card["members"][0]["file"] = "other.safetensors"
    (copy / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="first member"):
        verify_bundle(copy)


def test_scores_are_the_mean_over_members_and_mirrors_in_one_batch(ensemble_dir: Path) -> None:
    bundle = load_bundle(ensemble_dir, rewrite=False)
    assert isinstance(bundle.network, Ensemble) and len(bundle.network.members) == 2
    batch = _batch()
    seen: list[int] = []
    handles = [
        m.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
        for m in bundle.network.members
    ]
    logits = bundle.logits(batch)
    for handle in handles:
        handle.remove()
    assert seen == [6, 6]  # each member ran once, on the batch and its mirror together
    with torch.inference_mode():
        views = [batch, batch.flip(-1)]
        expected = torch.stack([m(v) for m in bundle.network.members for v in views]).mean(dim=0)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_scores_are_deterministic_and_do_not_depend_on_the_batch(ensemble_dir: Path) -> None:
    bundle = load_bundle(ensemble_dir)
    batch = _batch(4)
    first = bundle.predict(batch)
    assert np.array_equal(first, bundle.predict(batch))
    assert np.array_equal(first, load_bundle(ensemble_dir).predict(batch))
    one_by_one = np.concatenate([bundle.predict(batch[i : i + 1]) for i in range(4)])
    np.testing.assert_allclose(first, one_by_one, atol=1e-5)
    assert ((first >= 0) & (first <= 1)).all()


def test_served_rewrite_keeps_the_ensemble_scores(ensemble_dir: Path) -> None:
    batch = _batch()
    served = load_bundle(ensemble_dir).predict(batch)
    as_trained = load_bundle(ensemble_dir, rewrite=False).predict(batch)
    np.testing.assert_allclose(served, as_trained, atol=1e-4)


def test_a_single_network_bundle_is_served_as_before(tmp_path: Path) -> None:
    card = save_bundle(tmp_path / "plain", FIELDS, _states(1))
    assert card.members == () and card.tta == "none"
    bundle = load_bundle(tmp_path / "plain")
    assert not isinstance(bundle.network, Ensemble)


def test_members_of_different_architectures_load_as_written(tmp_path: Path) -> None:
    torch.manual_seed(3)
    lite1 = create_network("tf_efficientnet_lite1", num_classes=2).state_dict()
    kinds = ["tf_efficientnet_lite0", "tf_efficientnet_lite1"]
    card = save_bundle(tmp_path / "mixed", FIELDS, [_states(1)[0], lite1], architectures=kinds)
    assert [m.architecture for m in card.members] == kinds
    bundle = load_bundle(tmp_path / "mixed", rewrite=False)
    assert isinstance(bundle.network, Ensemble)
    depths = [sum(len(stage) for stage in m.blocks) for m in bundle.network.members]
    assert depths[1] > depths[0]  # Lite1 is deeper: the second member really is a Lite1
    assert np.array_equal(
        bundle.predict(_batch()), load_bundle(tmp_path / "mixed", rewrite=False).predict(_batch())
    )
    with pytest.raises(ValueError, match="one architecture per member"):
        save_bundle(tmp_path / "bad", FIELDS, _states(2), architectures=kinds[:1])
