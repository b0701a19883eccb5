"""Throughput of the default network: training and inference images/s, with ratios.

CPU: fp32 contiguous (baseline) vs channels_last. CUDA, when present: fp32 (baseline) vs
AMP + channels_last. Training uses the default recipe (stem + 4 stages frozen). Inputs are
random tensors, so this measures the network, not JPEG decoding.

    python bench/train.py [--batch-size 32] [--steps 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from models.pretrained import pretrained_network
from models.train import freeze_early


def images_per_second(
    device: torch.device, train: bool, amp: bool, channels_last: bool, batch: int, steps: int
) -> float:
    """Images/s of one configuration, after one warm-up step.

    Args:
        device: where to run.
        train: forward + backward + optimizer step (else inference only).
        amp: autocast to fp16 (CUDA) with a gradient scaler.
        channels_last: NHWC memory format for weights and inputs.
        batch: images per step.
        steps: timed steps.

    Returns:
        Images per second.
    """
    network = pretrained_network("tf_efficientnet_lite0", num_classes=2)
    freeze_early(network, 4)
    memory = torch.channels_last if channels_last else torch.contiguous_format
    network.to(device).to(memory_format=memory).train(train)
    inputs = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=memory)
    targets = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    def step() -> None:
        with torch.autocast(device.type, enabled=amp):
            if not train:
                with torch.inference_mode():
                    network(inputs)
                return
            loss = torch.nn.functional.cross_entropy(network(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
        scaler.step(optimizer)
        scaler.update()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - started)


def main() -> None:
    """Print images/s per configuration and the ratio to each device's baseline."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    configs = [
        (torch.device("cpu"), "fp32", False, False),
        (torch.device("cpu"), "channels_last", False, True),
    ]
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        configs += [(cuda, "fp32", False, False), (cuda, "amp+channels_last", True, True)]
    for mode in ("train", "inference"):
        baseline: dict[str, float] = {}
        for device, name, amp, channels_last in configs:
            rate = images_per_second(device, mode == "train", amp, channels_last, args.batch_size, args.steps)
            base = baseline.setdefault(device.type, rate)
            print(
                f"{mode:9s} {device.type:4s} {name:18s} {rate:8.1f} img/s"
                f"  x{rate / base:.2f} vs {device.type} fp32"
            )


if __name__ == "__main__":
    main()
