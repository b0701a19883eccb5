"""Grad-CAM (Selvaraju et al. 2017): where the network looked for its positive score.

The heat map weighs the last feature map's channels by the mean gradient of the positive
logit and keeps the positive part. It shows the evidence the network used, not a finding;
it is for review and debugging, never a segmentation. For an ensemble bundle the map is
the mean of the members' maps (mirrored views are not included).
"""

from __future__ import annotations

import numpy as np
import torch

from models.bundle import Bundle, networks_of


def gradcam(bundle: Bundle, input_chw: np.ndarray | torch.Tensor) -> np.ndarray:
    """Grad-CAM heat map of the bundle's positive label for one preprocessed image.

    Args:
        bundle: a loaded bundle whose timm network has ``forward_features``/``forward_head``.
        input_chw: one ``(3, S, S)`` input from :func:`models.preprocess.to_input`.

    Returns:
        ``float32`` array ``(S, S)`` in ``[0, 1]`` (all zeros when no region raises the score).

    Raises:
        ValueError: if the input is not ``(3, S, S)``.
        RuntimeError: if the network's head does not depend on its feature map.
    """
    inputs = torch.as_tensor(input_chw, dtype=torch.float32)
    if inputs.ndim != 3 or inputs.shape[0] != 3:
        raise ValueError(f"expected a (3, S, S) input, got {tuple(inputs.shape)}")
    cams = [_member_cam(network.eval(), inputs, bundle) for network in networks_of(bundle.network)]
    cam = torch.stack(cams).mean(dim=0)
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).cpu().numpy().astype(np.float32)


def _member_cam(network: torch.nn.Module, inputs: torch.Tensor, bundle: Bundle) -> torch.Tensor:
    """One network's unnormalised Grad-CAM, resized to the input."""
    with torch.no_grad():
        features = network.forward_features(inputs[None].to(bundle.device))  # type: ignore[operator]
    # Only the feature map needs a gradient; the weights stay untouched.
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = network.forward_head(features)  # type: ignore[operator]
        logits[0, bundle.card.positive_index].backward()
    if features.grad is None:
        raise RuntimeError("no gradient reached the feature map")
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features.detach()).sum(dim=1, keepdim=True))
    resized: torch.Tensor = torch.nn.functional.interpolate(
        cam, size=tuple(inputs.shape[1:]), mode="bilinear", align_corners=False
    )[0, 0]
    return resized
