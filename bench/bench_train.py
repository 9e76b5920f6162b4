"""Training at scale: peak memory of `train` on a small and a 16x larger pair, and throughput.

Memory: the synthetic demo pair is generated at 1024² px and repeated 4 x 4 times into a
4096² pair (both rasters written tile by tile, in this process), then
the real `alphaearth-height train` command (calibration off) runs on each in a child
process that reports its own peak RSS (VmHWM; the reading workers are separate processes
holding one batch each). Training reads patches by windows and evaluates tile by tile, so the
ratio should stay near 1 (the goal is ≤ 1.3; nothing asserts it).

Throughput: optimiser steps in patches per second for U-Net and U-Net++ (ResNet-18, encoder
depth 4, the experiment's settings) on the CPU and, when one is present, on the GPU with
AMP on and off; the first steps are a warm-up and not counted.

    .venv/bin/python bench/bench_train.py [--sizes 1024 4096] [--no-memory] [--no-throughput]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from alphaearth_height.plugin.core.demo_scene import generate_demo_scene
from alphaearth_height.training.train import TrainConfig, _Trainer

# Runs `train` and writes the process's own peak RSS (VmHWM, KiB) to argv[1]. Not wait4's
# ru_maxrss: Linux carries the parent's peak across fork and exec into it, so every child of
# this (large) process would report this process's peak.
# The peak is also noted as the evaluation starts: training itself against the whole command.
TRAIN_AND_REPORT = """
import sys
import alphaearth_height.training.evaluate as evaluate
from alphaearth_height.cli import main

def peak():
    return next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]

before = []
whole = evaluate.evaluate_model
def noting(*args, **kwargs):
    before.append(peak())
    return whole(*args, **kwargs)
evaluate.evaluate_model = noting
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(f"{before[0]} {peak()}")
sys.exit(code)
"""


def peak_rss_of_train(embeddings: Path, reference: Path, out: Path,
                      args: argparse.Namespace) -> tuple[float, float, float]:
    """(peak RSS in MiB of the training process before its evaluation, and overall; seconds) of one
    `train` run in a child process."""
    report = out.with_suffix(".peak")
    command = [sys.executable, "-c", TRAIN_AND_REPORT, str(report), "train", "--embeddings", str(embeddings),
               "--reference", str(reference), "--out", str(out),
               "--arch", "unet", "--encoder-depth", "3", "--decoder-channels", "16,16,8", "--patch-size",
               str(args.patch_size), "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", str(args.steps),
               "--workers", str(args.workers), "--device", "cpu", "--no-calibration"]
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"train failed on {embeddings}: {result.stderr[-2000:]}")
    before, whole = (int(v) / 1024 for v in report.read_text().split())
    return before, whole, seconds


def tiled(source: Path, out: Path, times: int) -> Path:
    """A raster ``times`` x ``times`` as large, the source repeated side by side, written tile by
    tile (generating a 4096² demo scene at once needs over 20 GB of RAM)."""
    import rasterio
    from affine import Affine

    with rasterio.open(source) as src:
        profile = src.profile.copy()
        t = src.transform
        profile.update(width=src.width * times, height=src.height * times, tiled=True, blockxsize=256,
                       blockysize=256, transform=Affine(t.a, t.b, t.c, t.d, t.e, t.f))
        values = src.read()
        with rasterio.open(out, "w", **profile) as dst:
            for i in range(times):
                for j in range(times):
                    dst.write(values, window=rasterio.windows.Window(j * src.width, i * src.height, src.width,
                                                                     src.height))
    return out


def memory(args: argparse.Namespace) -> None:
    small, large = args.sizes
    if large % small:
        raise SystemExit("the larger size must be a multiple of the smaller")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scene = generate_demo_scene(Path(tmp) / "pair", width=small, height=small)
        big = Path(tmp) / "big"
        big.mkdir()
        pairs = {small: (scene.embeddings, scene.reference),
                 large: (tiled(scene.embeddings, big / "embeddings.tif", large // small),
                         tiled(scene.reference, big / "reference_dsm.tif", large // small))}
        for size, (embeddings, reference) in pairs.items():
            rows.append((size, *peak_rss_of_train(embeddings, reference, Path(tmp) / f"run{size}", args)))
    print(f"peak RSS of `train` (CPU, U-Net depth 3, {args.patch_size} px patches, batch 4, 1 epoch of "
          f"{args.steps} steps, {args.workers} reading workers, calibration off: its 8 TTA passes over the "
          "validation strip take the predict path the evaluation already takes)")
    print(f"{'pair':>9}  {'training MiB':>12}  {'whole run MiB':>13}  {'seconds':>7}")
    for size, before, whole, seconds in rows:
        print(f"{size:>7}²  {before:12.0f}  {whole:13.0f}  {seconds:7.0f}")
    (_, b0, w0, _), (_, b1, w1, _) = rows
    print(f"ratio {rows[1][0]}² / {rows[0][0]}² ({(rows[1][0] / rows[0][0]) ** 2:.0f}x the pixels): training "
          f"{b1 / b0:.2f}, whole run with the evaluation {w1 / w0:.2f} (goal ≤ 1.3)")


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
