"""The demo: synthetic scene -> bundled model -> difference and metrics, next to ridge."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..plugin.core import aef
from ..plugin.core.compare import compare_heights
from ..plugin.core.demo_scene import generate_demo_scene
from ..plugin.core.inference import predict_height
from ..plugin.core.metrics import format_metrics_table, height_metrics, json_safe
from ..plugin.core.models import bundled_model_dir, load_model
from ..plugin.core.plots import render_maps
from ..plugin.core.rasters import check_new_folder, ensure_free_space, make_partial_dir, raster_bytes
from .baseline import RidgeBaseline, pixels
from .data import load_pair


DEMO_SIZE = 1024  # generate_demo_scene's default side in pixels


@dataclass
class DemoResult:
    out_dir: Path
    metrics: dict
    table: str


def _inside(mask: np.ndarray, window) -> np.ndarray:
    """``mask`` restricted to a window of the grid."""
    kept = np.zeros_like(mask)
    kept[window.toslices()] = mask[window.toslices()]
    return kept


def demo_bytes(size: int = DEMO_SIZE) -> int:
    """Disk space the demo's outputs take at least: the 64-band int8 scene, the 5 m reference, two height rasters."""
    return (raster_bytes(size, size, aef.N_BANDS, "int8") + raster_bytes(2 * size, 2 * size)
            + 2 * raster_bytes(size, size))


def run_demo(out_dir: str | os.PathLike = "demo_output", model: Optional[str | os.PathLike] = None,
             device: str = "auto", log: Callable[[str], None] = print,
             progress: Optional[Callable[[int, int], None]] = None) -> DemoResult:
    """Write the demo into ``out_dir``, a new or empty folder; it appears there only once complete.

    The model is loaded and the free space checked before anything is written.
    """
    out = Path(out_dir)
    check_new_folder(out, "the demo")
    package = load_model(model or bundled_model_dir())
    ensure_free_space(out, demo_bytes(), "the demo")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_partial_dir(out)
    try:
        result = _run_demo(staging, out, package, device, log, progress)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DemoResult(out, _moved(result.metrics, staging, out), result.table)


def _moved(value, staging: Path, out: Path):
    """Paths recorded while writing into the staging folder, as they are after the rename."""
    if isinstance(value, dict):
        return {k: _moved(v, staging, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, staging, out) for v in value]
    if isinstance(value, str) and value.startswith(str(staging)):
        return str(out) + value[len(str(staging)):]
    return value


def _run_demo(out: Path, final: Path, package, device: str, log: Callable[[str], None],
              progress: Optional[Callable[[int, int], None]]) -> DemoResult:
    """The demo written into ``out`` (the staging folder), recording ``final`` where paths are written."""
    log("generating the synthetic demo scene (AEF int8 embeddings, EPSG:32630; reference DSM, EPSG:2154 at 5 m)")
    scene = generate_demo_scene(out)
    log(f"predicting with {package.name}")
    predicted = out / "predicted_height.tif"
    result = predict_height(scene.embeddings, package, predicted, device=device, progress=progress)
    log(f"predicted {result.grid.width}x{result.grid.height} px in {result.seconds:.1f} s on {result.device}")
    difference = out / "difference.tif"
    regions = {"train": scene.train_window, "test": scene.test_window}
    metrics = compare_heights(predicted, scene.reference, difference, regions=regions)

    pair = load_pair(scene.embeddings, scene.reference)
    ridge = RidgeBaseline().fit(*pixels(pair.embeddings, pair.reference, _inside(pair.label_mask, scene.train_window)))
    baseline = {}
    for name, window in regions.items():
        features, heights = pixels(pair.embeddings, pair.reference, _inside(pair.label_mask, window))
        baseline[name] = height_metrics(ridge.predict(features), heights)
    metrics["baseline_ridge"] = baseline
    metrics["model"] = {"name": package.name, "path": str(package.path), "device": result.device,
                        "seconds": result.seconds}
    metrics_file = out / "metrics.json"
    metrics_file.write_text(json.dumps(json_safe(_moved(metrics, out, final)), indent=2) + "\n")

    render_maps(out / "height_maps.png", predicted, difference, reference_on_grid=pair.reference,
                split_fraction=scene.test_start_col / scene.grid.width,
                title="Synthetic demo scene: training area left of the dashed line, test area right")
    label = package.card["model"]["architecture"]
    rows = {f"{label} train": metrics["regions"]["train"], f"{label} test": metrics["regions"]["test"],
            "ridge train": baseline["train"], "ridge test": baseline["test"]}
    table = format_metrics_table(rows)
    return DemoResult(out, metrics, table)
