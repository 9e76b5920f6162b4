"""Training at scale: peak memory of `train` on a small and a 16x larger pair, and throughput.

Memory: the synthetic demo pair is generated at 1024² and 4096² px (in this process), then
the real `alphaearth-height train` command runs on each in a child process whose peak RSS
is read from the OS (wait4). Training reads patches by windows and evaluates tile by tile,
so the ratio should stay near 1 (the goal is ≤ 1.3; nothing asserts it).

Throughput: optimiser steps in patches per second for U-Net and U-Net++ (ResNet-18, encoder
depth 4, the experiment's settings) on the CPU and, when one is present, on the GPU with
AMP on and off; the first steps are a warm-up and not counted.

    .venv/bin/python bench/bench_train.py [--sizes 1024 4096] [--no-memory] [--no-throughput]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alphaearth_height.plugin.core.demo_scene import generate_demo_scene
from alphaearth_height.training.train import TrainConfig, _Trainer

CLI = Path(sys.executable).parent / "alphaearth-height"


def peak_rss_of_train(embeddings: Path, reference: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one `train` run in a child process."""
    command = [str(CLI), "train", "--embeddings", str(embeddings), "--reference", str(reference), "--out", str(out),
               "--arch", "unet", "--encoder-depth", "3", "--decoder-channels", "16,16,8", "--patch-size",
               str(args.patch_size), "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", str(args.steps),
               "--workers", str(args.workers), "--device", "cpu", "--no-calibration"]
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"train failed on {embeddings}: {child.stderr.read()}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def memory(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            scene = generate_demo_scene(Path(tmp) / f"pair{size}", width=size, height=size)
            rss, seconds = peak_rss_of_train(scene.embeddings, scene.reference, Path(tmp) / f"run{size}", args)
            rows.append((size, rss, seconds))
            for path in (scene.embeddings, scene.reference):
                path.unlink()
    print(f"peak RSS of `train` (CPU, U-Net depth 3, {args.patch_size} px patches, batch 4, 1 epoch of "
          f"{args.steps} steps, {args.workers} reading workers, evaluation included, calibration off: its 8 TTA "
          f"passes over the validation strip take the predict path the evaluation already takes)")
    for size, rss, seconds in rows:
        print(f"{size:>6}² px  {rss:8.0f} MiB  {seconds:6.0f} s")
    print(f"ratio {rows[-1][0]}² / {rows[0][0]}²: {rows[-1][1] / rows[0][1]:.2f} (goal ≤ 1.3) for "
          f"{(rows[-1][0] / rows[0][0]) ** 2:.0f}x the pixels")


def patches_per_second(scene, arch: str, device: str, amp: bool, args: argparse.Namespace) -> float:
    config = TrainConfig(embeddings=str(scene.embeddings), reference=str(scene.reference), out="unused", arch=arch,
                         encoder_depth=4, decoder_channels=[96, 48, 24, 16], patch_size=args.patch_size,
                         batch_size=args.batch_size, steps_per_epoch=args.timed_steps + 2, device=device, amp=amp,
                         workers=0)
    trainer = _Trainer(config, log=lambda m: None, progress=None)
    trainer.draw_epoch()
    batches = iter(trainer.loader)
    for _ in range(2):
        trainer.step(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.timed_steps):
        trainer.step(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    trainer.close()
    return args.timed_steps * args.batch_size / (time.perf_counter() - start)


def throughput(args: argparse.Namespace) -> None:
    runs = [("cpu", False)] + ([("cuda", True), ("cuda", False)] if torch.cuda.is_available() else [])
    with tempfile.TemporaryDirectory() as tmp:
        scene = generate_demo_scene(tmp, width=512, height=512)
        rates = {(arch, d, amp): patches_per_second(scene, arch, d, amp, args) for arch in ("unet", "unetplusplus")
                 for d, amp in runs}
    print(f"training throughput, {args.patch_size} px patches, batch {args.batch_size}, {args.timed_steps} timed "
          f"steps ({torch.get_num_threads()} CPU threads"
          f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else '; no GPU: GPU not measured'})")
    names = {("cpu", False): "cpu", ("cuda", True): "cuda AMP", ("cuda", False): "cuda fp32"}
    print(f"{'model':<14}" + "".join(f"{names[r] + ' patches/s':>22}" for r in runs))
    for arch in ("unet", "unetplusplus"):
        print(f"{arch:<14}" + "".join(f"{rates[(arch, *r)]:>22.1f}" for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1024, 4096], help="sides of the two pairs, px")
    parser.add_argument("--steps", type=int, default=5, help="training steps of the memory runs")
    parser.add_argument("--workers", type=int, default=2, help="reading workers of the memory runs")
    parser.add_argument("--timed-steps", type=int, default=6)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-throughput", action="store_true")
    args = parser.parse_args()
    if not args.no_memory:
        memory(args)
    if not args.no_throughput:
        throughput(args)


if __name__ == "__main__":
    main()
