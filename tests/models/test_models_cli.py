"""``models list|show|import`` and the argparse wiring."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from models.bundle import ChecksumMismatch, verify_bundle
from models.cli import PERTURBATION_NAMES, add_commands, main
from models.data import PERTURBATIONS


def test_commands_are_registered() -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--bundle", "b", "--data", "d", "--tta"])
    assert callable(args.func) and args.tta
    args = parser.parse_args(["train", "--data", "d", "--out", "o", "--name", "n", "--version", "1"])
    assert args.epochs == 4 and args.frozen_stages == (3,) and args.seeds == (0,) and args.tta == "none"
    args = parser.parse_args(
        ["train", "--data", "d", "--out", "o", "--name", "n", "--version", "1", "--seeds", "0,1"]
    )
    assert args.seeds == (0, 1) and args.sizes == (160, 192)
    with pytest.raises(SystemExit):
        parser.parse_args(
            ["train", "--data", "d", "--out", "o", "--name", "n", "--version", "1", "--seeds", "a"]
        )


def test_perturbation_choices_are_the_evaluators() -> None:
    assert tuple(PERTURBATIONS) == PERTURBATION_NAMES


def test_list_and_show(
    tiny_bundle: Path, default_bundle_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["models", "list", "--dir", str(tiny_bundle.parent), "--dir", str(default_bundle_dir.parent)])
        == 0
    )
    out = capsys.readouterr().out
    for ref in ("tiny-test@0.0.1", "cxr-pneumonia@2.1.0", "cxr-pneumonia@2.0.0", "cxr-pneumonia-lite0@1.0.0"):
        assert ref in out
    assert main(["models", "show", str(tiny_bundle)]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tiny-test"


def test_import_copies_a_verified_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "var" / "models"
    assert main(["models", "import", str(tiny_bundle), "--dest", str(dest)]) == 0
    assert verify_bundle(dest / "tiny-test-0.0.1").name == "tiny-test"


def test_import_refuses_a_tampered_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(tiny_bundle, tampered)
    with (tampered / "weights.safetensors").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ChecksumMismatch):
        main(["models", "import", str(tampered), "--dest", str(tmp_path / "dest")])
    assert not (tmp_path / "dest").exists()
