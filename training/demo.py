"""The demo: synthetic scene -> bundled model -> the evaluation report (difference, metrics
per area of the model's split, plots), next to the per-pixel ridge baseline."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..plugin.core import aef
from ..plugin.core.demo_scene import generate_demo_scene
from ..plugin.core.metrics import format_metrics_table, json_safe
from ..plugin.core.models import bundled_model_dir, load_model
from ..plugin.core.rasters import check_new_folder, ensure_free_space, make_partial_dir, raster_bytes
from .evaluate import AREAS, write_report

DEMO_SIZE = 1024  # generate_demo_scene's default side in pixels
# the evaluation report's files under the names the demo has always written (README, make demo)
DEMO_FILES = {"prediction": "predicted_height.tif", "maps": "height_maps.png", "report": "metrics.json"}


@dataclass
class DemoResult:
    out_dir: Path
    metrics: dict
    table: str


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
    report = write_report(package, scene.embeddings, scene.reference, out, files=DEMO_FILES, device=device,
                          progress=progress, log=log)
    metrics = _moved(report, out, final)
    (out / DEMO_FILES["report"]).write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    label = package.card["model"]["architecture"]
    rows = {f"{who} {name}": report["areas"][name][key] for key, who in (("model", label), ("ridge", "ridge"))
            for name in AREAS}
    return DemoResult(out, metrics, format_metrics_table(rows))
