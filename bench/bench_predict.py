"""Predict throughput and peak memory, measured in one run (no timed assertions anywhere).

For each area size and backend (ONNX Runtime, torch) it prints the default tiling's
overhead (input pixels the model computes per output pixel), end-to-end `predict`
throughput (read, de-quantise, model, blend, write) next to model-only forward throughput
on the very same batches, and the peak resident memory of a fresh process predicting
that area; then, per backend, the memory ratio of the largest area to the smallest. Each
measurement runs ``--repeats`` times, alternated, and the best is kept: on a shared
machine a burst of other work then spoils one run, not the ratio.
Memory should barely grow with the area, since inference streams by tiles. It also
checks the two backends' heights agree (max |difference|).

    .venv/bin/python bench/bench_predict.py [--sizes 1024 4096] [--device auto] [--backends onnx torch] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from alphaearth_height.plugin.core import aef
from alphaearth_height.plugin.core.inference import (DEFAULT_BAND_WIDTH, TilePlan, TileReader, _read_batches,
                                                     make_runner, predict_height, read_cache_bytes)
from alphaearth_height.plugin.core.models import bundled_model_dir, open_package
from alphaearth_height.plugin.core.rasters import EmbeddingRaster
from rasterio.windows import Window

BATCH_SIZE = 4  # predict's default

def write_area(path: Path, side: int, block: int = 512) -> None:
    """An AEF-like int8 raster of side x side px, written block by block, stored as fetch
    stores the embeddings it writes (``aef.int8_profile``)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((aef.N_BANDS, block, block)).astype(np.float32)
    values /= np.linalg.norm(values, axis=0, keepdims=True)
    q = aef.quantise(values)
    profile = aef.int8_profile(side, side, "EPSG:32630", Affine(10, 0, 690000, 0, -10, 4975000))
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, side, block):
            for c in range(0, side, block):
                dst.write(q, window=Window(c, r, block, block))


FORMER_INT8 = {"compress": "deflate", "predictor": 2, "interleave": "pixel"}  # fetch's files before 2026-11-26


def write_former(path: Path, source: Path) -> None:
    """``source`` rewritten as fetch wrote embeddings before: pixel by pixel, DEFLATE with a predictor."""
    with rasterio.open(source) as src, rasterio.open(path, "w", **{**src.profile, **FORMER_INT8}) as dst:
        for _, window in src.block_windows(1):
            dst.write(src.read(window=window), window=window)


def read_only(path: Path, repeats: int) -> float:
    """Seconds predict's reader takes for every batch of ``path`` alone (best of ``repeats``)."""
    plan, best = default_plan(path), float("inf")
    for _ in range(repeats):
        with EmbeddingRaster(path) as src, rasterio.Env(GDAL_CACHEMAX=read_cache_bytes(src, plan)), \
                TileReader(src) as reader:
            start = time.perf_counter()
            for _ in _read_batches(reader, plan, BATCH_SIZE):
                pass
            best = min(best, time.perf_counter() - start)
    return best


def default_plan(path: Path) -> TilePlan:
    """The plan predict makes with the bundled model's defaults."""
    package = open_package(bundled_model_dir())
    with EmbeddingRaster(path) as src:
        return TilePlan(src.grid, package.default("tile", 256), package.default("overlap", 64), package.multiple,
                        DEFAULT_BAND_WIDTH)


def model_only(path: Path, device: str, backend: str) -> tuple[float, float, int]:
    """Seconds spent in forward passes alone over the batches predict would run, and seconds
    spent reading and de-quantising those batches (predict's own reader, on every core,
    one batch at a time, nothing else running): on the CPU, predict reads between the
    forward passes, so this is what it adds to them.

    The runner is fresh, as predict's is, and every pass is timed, the first included
    (ONNX Runtime and torch set up their buffers on it, ~0.1 s): the same forward passes
    predict makes, so the ratio is what reading, blending and writing add to them.
    """
    package = open_package(bundled_model_dir())
    runner = make_runner(package, backend, device)
    plan = default_plan(path)
    seconds, read_seconds = 0.0, 0.0
    with EmbeddingRaster(path) as src, rasterio.Env(GDAL_CACHEMAX=read_cache_bytes(src, plan)), \
            TileReader(src) as reader:
        batches = _read_batches(reader, plan, BATCH_SIZE)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            read_seconds += time.perf_counter() - start
            if batch is None:
                break
            if batch.stack is None:
                continue
            start = time.perf_counter()
            runner(batch.stack)
            seconds += time.perf_counter() - start
    return seconds, read_seconds, plan.total_tiles


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec;
    ru_maxrss there keeps the peak of the forked parent, so a child spawned by a big
    parent reported the parent's memory, not its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux; elsewhere a rough figure


def child(path: str, out: str, device: str, backend: str) -> None:
    """One area in a fresh process: model load (imports included), then predict, then peak RSS."""
    start = time.perf_counter()
    package = open_package(bundled_model_dir())
    make_runner(package, backend, device)  # imports and graph/module load, outside predict's own timing
    load_seconds = time.perf_counter() - start
    result = predict_height(path, package, out, device=device, backend=backend, batch_size=BATCH_SIZE)
    peak_mb = peak_rss_mb()
    print(json.dumps({"seconds": result.seconds, "load_seconds": load_seconds, "tiles": result.tiles,
                      "peak_mb": peak_mb, "device": result.device}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backends", nargs="+", default=["onnx", "torch"])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is kept")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child[:2], args.device, args.child[2])
        return
    rows, tiling, formats = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            emb = Path(tmp) / f"e{side}.tif"
            write_area(emb, side)
            if side == min(args.sizes):
                former = Path(tmp) / f"former{side}.tif"
                write_former(former, emb)
                now, before = read_only(emb, args.repeats), read_only(former, args.repeats)
                formats.append(f"  {side}x{side}: band by band, ZSTD (what fetch writes) {now:.2f} s; pixel by pixel, "
                               f"DEFLATE + predictor (fetch's files before) {before:.2f} s: x{now / before:.2f}")
                former.unlink()
            plan = default_plan(emb)
            tiling.append(f"{side}x{side}: {plan.total_tiles} tiles of {plan.tw}x{plan.th} px (tile {plan.tile}, "
                          f"overlap {plan.overlap}): {plan.input_per_output:.3f} input px per output px")
            heights = {}
            for backend in args.backends:
                out = Path(tmp) / f"h{side}-{backend}.tif"
                e2e_runs, fwd_runs = [], []
                for _ in range(args.repeats):  # alternated, so a burst of other work hits both kinds
                    out.unlink(missing_ok=True)
                    run = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(emb),
                                          str(out), backend], capture_output=True, text=True, check=True)
                    e2e_runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
                    fwd_runs.append(model_only(emb, args.device, backend))
                e2e = min(e2e_runs, key=lambda r: r["seconds"])
                fwd_seconds, read_seconds = min(r[0] for r in fwd_runs), min(r[1] for r in fwd_runs)
                tiles = fwd_runs[0][2]
                peak_mb = max(r["peak_mb"] for r in e2e_runs)
                mpx = side * side / 1e6
                rows.append((side, backend, tiles, e2e["seconds"], mpx / e2e["seconds"], mpx / fwd_seconds,
                             fwd_seconds / e2e["seconds"], peak_mb, e2e["device"], e2e["load_seconds"],
                             read_seconds, fwd_seconds))
                with rasterio.open(out) as src:
                    heights[backend] = src.read(1)
            if len(heights) == 2:
                a, b = heights.values()
                print(f"{side}x{side}: backends agree within {np.abs(a - b).max():.4f} m (max |difference|)")
    print("reading every batch with predict's reader, nothing else running, by how the embeddings are stored:")
    for line in formats:
        print(line)
    print("default tiling of the bundled model (the model computes each input pixel of each tile):")
    for line in tiling:
        print("  " + line)
    print(f"bundled model; throughput = output megapixels (10 m) per second; load = imports + model load, "
          f"before the timed predict; best of {args.repeats} alternated runs; read s = reading and de-quantising "
          "the same batches alone; model s = the forward passes alone")
    print(f"{'area (px)':>11} {'backend':>8} {'tiles':>6} {'load s':>7} {'predict s':>10} {'model s':>8} "
          f"{'read s':>7} {'end-to-end Mpx/s':>17} {'model-only Mpx/s':>17} {'e2e/model':>10} {'peak RSS MB':>12}  device")
    for side, backend, tiles, secs, e2e, fwd, ratio, peak, device, load, read, model in rows:
        print(f"{side:>5}x{side:<5} {backend:>8} {tiles:>6} {load:>7.1f} {secs:>10.1f} {model:>8.1f} {read:>7.1f} "
              f"{e2e:>17.3f} {fwd:>17.3f} {ratio:>10.2f} {peak:>12.0f}  {device}")
    for backend in args.backends:
        mine = [row for row in rows if row[1] == backend]
        if len(mine) > 1:
            a, b = mine[0], mine[-1]  # peak memory: the highest of the repeats
            print(f"{backend}: peak RSS {a[0]}x{a[0]} {a[7]:.0f} MB, {b[0]}x{b[0]} {b[7]:.0f} MB: "
                  f"area x{(b[0] / a[0]) ** 2:.0f} -> peak memory x{b[7] / a[7]:.2f}")
        print(f"{backend}: end-to-end / model-only " + ", ".join(f"{row[0]}x{row[0]} {row[6]:.2f}" for row in mine))


if __name__ == "__main__":
    main()
