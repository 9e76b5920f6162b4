"""Training throughput in patches per second, measured in one run (no timed assertions anywhere).

For U-Net and U-Net++ (ResNet-18, encoder depth 4, the experiment's settings) it times
optimiser steps on the synthetic demo scene, on the CPU and, when one is present, on the
GPU (where AMP + channels_last apply); the first steps are a warm-up and not counted.

    .venv/bin/python bench/bench_train.py [--steps 6] [--patch-size 128] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from alphaearth_height.plugin.core.demo_scene import generate_demo_scene
from alphaearth_height.training.train import TrainConfig, _Trainer


def patches_per_second(scene, arch: str, device: str, args: argparse.Namespace) -> float:
    config = TrainConfig(embeddings=str(scene.embeddings), reference=str(scene.reference), out="unused", arch=arch,
                         encoder_depth=4, decoder_channels=[96, 48, 24, 16], patch_size=args.patch_size,
                         batch_size=args.batch_size, device=device)
    trainer = _Trainer(config, log=lambda m: None, progress=None)
    for _ in range(2):
        trainer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        scene = generate_demo_scene(tmp, width=512, height=512)
        rates = {(arch, d): patches_per_second(scene, arch, d, args) for arch in ("unet", "unetplusplus")
                 for d in devices}
    print(f"training throughput, {args.patch_size} px patches, batch {args.batch_size}, {args.steps} timed steps "
          f"({torch.get_num_threads()} CPU threads{', ' + torch.cuda.get_device_name() if 'cuda' in devices else ''})")
    print(f"{'model':<14}" + "".join(f"{d + ' patches/s':>18}" for d in devices)
          + ("  gpu/cpu" if len(devices) > 1 else ""))
    for arch in ("unet", "unetplusplus"):
        cells = "".join(f"{rates[(arch, d)]:>18.1f}" for d in devices)
        ratio = f"  x{rates[(arch, 'cuda')] / rates[(arch, 'cpu')]:.1f}" if len(devices) > 1 else ""
        print(f"{arch:<14}{cells}{ratio}")
    print(f"U-Net++ / U-Net on cpu: x{rates[('unetplusplus', 'cpu')] / rates[('unet', 'cpu')]:.2f}")


if __name__ == "__main__":
    main()
