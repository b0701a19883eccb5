"""CUDA checks (skipped without a GPU; bench/gpu.sh runs them on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle import load_bundle

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_amp_scores_match_cpu_and_do_not_depend_on_batching(tiny_bundle: Path) -> None:
    cpu = load_bundle(tiny_bundle, "cpu")
    assert not load_bundle(tiny_bundle, "cuda:0").amp  # fp32 by default, as on the CPU
    gpu = load_bundle(tiny_bundle, "cuda:0", amp=True)
    assert gpu.amp
    size = cpu.card.preprocessing.input_size
    batch = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
    on_cpu = cpu.predict(batch)
    batched = gpu.predict(batch)
    single = np.concatenate([gpu.predict(batch[i : i + 1]) for i in range(len(batch))])
    assert np.abs(batched - on_cpu).max() < 0.02  # bf16 autocast against fp32
    assert np.abs(batched - single).max() < 0.01
