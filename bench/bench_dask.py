"""Prediction on a Dask LocalCluster: 1 vs 2 worker processes on the same area (no assertions).

Prints, for the bundled model on one AEF-like area: the single-process ``predict`` as the
reference, then the chunked run on a LocalCluster of 1 and of 2 workers (cluster start
timed apart from the prediction; the workers' imports and model load fall in the
prediction), each with its throughput and its largest difference
from the single-process heights (which must stay within 0.01 m). Speed-up needs free
cores: on a 2-core machine each ONNX Runtime worker also wants both cores.

    .venv/bin/python bench/bench_dask.py [--side 2048] [--chunk 1024] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import write_area  # noqa: E402  (the same synthetic area as the predict benchmark)

from alphaearth_height.plugin.core.distributed import Layout, open_client, plan_chunks, predict_distributed  # noqa: E402,E501
from alphaearth_height.plugin.core.inference import predict_height  # noqa: E402
from alphaearth_height.plugin.core.models import bundled_model_dir, open_package  # noqa: E402


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=2048, help="area side in px (default 2048: 4 Mpx)")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk side in px (default 1024)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    model = bundled_model_dir()
    mpx = args.side * args.side / 1e6
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        folder = Path(tmp)
        area = folder / "area.tif"
        write_area(area, args.side)
        started = time.perf_counter()
        single = predict_height(area, model, folder / "single.tif", device="cpu")
        seconds = time.perf_counter() - started
        reference = _read(single.path)
        package = open_package(model)
        tile = int(package.default("tile", 256))
        layout = Layout.of(args.side, args.side, tile, int(package.default("overlap", tile // 4)), package.multiple)
        chunks = plan_chunks(args.side, args.side, args.chunk, layout)
        chunk_tiles = sum(len(c.rows) * len(c.cols) for c in chunks)
        print(f"bundled model, {args.side}x{args.side} px ({mpx:g} Mpx), {len(chunks)} chunks of {args.chunk} px, "
              f"CPU, {os.cpu_count()} cores; tiles run: {single.tiles} in one process, {chunk_tiles} in chunks "
              "(tiles across a chunk edge run in both chunks)")
        print(f"{'run':>24}  {'start s':>7}  {'predict s':>9}  {'Mpx/s':>6}  {'max |diff| m':>12}")
        print(f"{'single process':>24}  {'-':>7}  {seconds:9.1f}  {mpx / seconds:6.3f}  {0.0:12.4f}")
        for n in args.workers:
            started = time.perf_counter()
            with open_client(workers=n) as client:
                start_s = time.perf_counter() - started
                started = time.perf_counter()
                result = predict_distributed(area, model, folder / f"dask{n}.vrt", client=client,
                                             chunk_size=args.chunk, device="cpu")
                seconds = time.perf_counter() - started
            diff = float(np.max(np.abs(_read(result.path) - reference)))
            print(f"{f'LocalCluster {n} worker(s)':>24}  {start_s:7.1f}  {seconds:9.1f}  {mpx / seconds:6.3f}  "
                  f"{diff:12.4f}")


if __name__ == "__main__":
    main()
