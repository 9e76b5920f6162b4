"""One height-mapping job: AOI clip -> prediction -> (difference, metrics, plots).

The QGIS dock's task, the Processing algorithms and the CLI all run this, so there is
one code path from embeddings to layers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .aoi import AreaOfInterest, clip_embeddings
from .compare import compare_heights
from .errors import InputError
from .inference import CancelFn, predict_height
from .models import ModelPackage, bundled_model_dir, load_model

Progress = Callable[[float], None]


@dataclass
class HeightJob:
    embeddings: str
    out_dir: str
    model: Optional[str] = None          # None: the bundled model
    aoi: Optional[AreaOfInterest] = None  # None: the whole embeddings raster
    reference: Optional[str] = None
    name: str = "height"
    device: str = "auto"
    tile: Optional[int] = None
    overlap: Optional[int] = None
    batch_size: int = 4


@dataclass
class HeightJobResult:
    predicted: Path
    embeddings: Path
    difference: Optional[Path] = None
    metrics_file: Optional[Path] = None
    metrics: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    device: str = ""
    model_name: str = ""


def safe_name(text: str) -> str:
    """A file-name-safe layer/file stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "height"


def run_height_job(job: HeightJob, progress: Optional[Progress] = None,
                   cancel: Optional[CancelFn] = None, package: Optional[ModelPackage] = None) -> HeightJobResult:
    """Run a job; progress gets 0-100. Outputs are named ``<name>_*.tif`` in ``out_dir``."""
    report = progress or (lambda value: None)
    out = Path(job.out_dir)
    if not out.is_dir():
        raise InputError(out, "is not an existing folder", "Create the output folder or choose another one")
    stem = safe_name(job.name)
    package = package or load_model(job.model or bundled_model_dir())
    embeddings = Path(job.embeddings)
    if job.aoi is not None:
        embeddings = out / f"{stem}_embeddings.tif"
        clip_embeddings(job.embeddings, job.aoi, embeddings)
    report(5.0)
    predicted = out / f"{stem}_height.tif"
    try:
        prediction = predict_height(embeddings, package, predicted, tile=job.tile, overlap=job.overlap,
                                    batch_size=job.batch_size, device=job.device, cancel=cancel,
                                    progress=lambda done, total: report(5.0 + 85.0 * done / total))
    except BaseException:
        if job.aoi is not None:  # the clip was ours; a failed run leaves nothing behind
            embeddings.unlink(missing_ok=True)
        raise
    result = HeightJobResult(predicted, embeddings, device=prediction.device, model_name=package.name)
    if job.reference:
        if cancel and cancel():
            return result
        result.difference = out / f"{stem}_difference.tif"
        result.metrics_file = out / f"{stem}_metrics.json"
        result.metrics = compare_heights(predicted, job.reference, result.difference, result.metrics_file,
                                         plots_prefix=str(out / stem))
        result.plots = result.metrics.get("plots", [])
    report(100.0)
    return result


def remove_outputs(result: HeightJobResult) -> None:
    """Delete what a job wrote (used when a run is cancelled after prediction)."""
    clip = result.embeddings if result.embeddings.name.endswith("_embeddings.tif") else None
    for path in (result.predicted, result.difference, result.metrics_file, clip, *map(Path, result.plots)):
        if path and os.path.exists(path):
            os.remove(path)
