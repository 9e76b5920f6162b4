"""One height-mapping job: fetch embeddings -> prediction -> (difference, metrics, plots).

The QGIS dock's task, the Processing algorithms and the CLI all run this, and the
embeddings come through core.fetch like everywhere else, so there is one code path
from an embedding source to layers.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .aoi import AreaOfInterest
from .compare import compare_heights
from .errors import InputError
from .fetch import fetch
from .inference import CancelFn
from .models import ModelPackage, bundled_model_dir, load_model
from .terrain import predict_surface

Progress = Callable[[float], None]
FETCH_END, PREDICT_END = 20.0, 90.0  # progress: fetch 0-20 %, predict 20-90 %, compare to 100 %


@dataclass
class HeightJob:
    embeddings: str                       # source "local": the raster; remote sources: unused ("")
    out_dir: str
    model: Optional[str] = None           # None: the bundled model
    aoi: Optional[AreaOfInterest] = None  # None: the whole local raster, used as is
    reference: Optional[str] = None
    name: str = "height"
    device: str = "auto"
    tile: Optional[int] = None
    overlap: Optional[int] = None
    batch_size: int = 4
    source: str = "local"                 # a core.fetch source: local, cog or earthengine
    year: int = 2020
    source_options: dict[str, Any] = field(default_factory=dict)  # e.g. project, base_url
    cache_dir: Optional[str] = None       # None: core.fetch's default tile cache
    terrain: Optional[str] = None         # coarse terrain raster, for models trained relative to one


@dataclass
class HeightJobResult:
    predicted: Path
    embeddings: Path
    fetched: bool = False  # embeddings were written by the job (and go with its other outputs)
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
    """Run a job; progress gets 0-100. Outputs are named ``<name>_*.tif`` in ``out_dir``.

    A failed or cancelled run removes whatever it wrote, fetched embeddings included.
    """
    report = progress or (lambda value: None)
    out = Path(job.out_dir)
    if not out.is_dir():
        raise InputError(out, "is not an existing folder", "Create the output folder or choose another one")
    if job.aoi is None and job.source != "local":
        raise InputError(f"source {job.source!r}", "needs an area of interest",
                         "Draw an area or give an extent; only a local raster can be used whole")
    stem = safe_name(job.name)
    package = package or load_model(job.model or bundled_model_dir())
    started = time.time()
    result = HeightJobResult(out / f"{stem}_height.tif", Path(job.embeddings), fetched=job.aoi is not None)
    if result.fetched:
        result.embeddings = out / f"{stem}_embeddings.tif"
        _fetch(job, result.embeddings, report, cancel)
    report(FETCH_END)
    try:
        prediction = predict_surface(result.embeddings, package, result.predicted, terrain=job.terrain,
                                     tile=job.tile, overlap=job.overlap, batch_size=job.batch_size,
                                     device=job.device, cancel=cancel,
                                     progress=_scaled(report, FETCH_END, PREDICT_END))
        result.device, result.model_name = prediction.device, package.name
        if job.reference and not (cancel and cancel()):
            _compare(job, result, out / stem)
    except BaseException:
        remove_outputs(result, since=started)
        raise
    report(100.0)
    return result


def _fetch(job: HeightJob, out_path: Path, report: Progress, cancel: Optional[CancelFn]) -> None:
    """The AOI's embeddings from the job's source (a local raster is an option like any other)."""
    options = dict(job.source_options)
    if job.source == "local":
        options["raster"] = job.embeddings
    fetch(job.aoi, job.year, job.source, out_path, cache_dir=job.cache_dir, cancel=cancel,
          progress=_scaled(report, 0.0, FETCH_END), **options)


def _compare(job: HeightJob, result: HeightJobResult, prefix: Path) -> None:
    result.difference = prefix.with_name(prefix.name + "_difference.tif")
    result.metrics_file = prefix.with_name(prefix.name + "_metrics.json")
    result.metrics = compare_heights(result.predicted, job.reference, result.difference, result.metrics_file,
                                     plots_prefix=str(prefix))
    result.plots = result.metrics.get("plots", [])


def _scaled(report: Progress, start: float, end: float) -> Callable[[int, int], None]:
    """A core ``progress(done, total)`` callback mapped onto one stage's share of 0-100."""
    return lambda done, total: report(start + (end - start) * done / max(total, 1))


def remove_outputs(result: HeightJobResult, since: Optional[float] = None) -> None:
    """Delete what a job wrote (a failed run, or one cancelled after prediction).

    The embeddings go only when the job fetched them: a local raster used whole is the
    user's input, not an output. With ``since``, files older than that (an earlier
    run's outputs under the same name) are kept.
    """
    fetched = result.embeddings if result.fetched else None
    for path in (result.predicted, result.difference, result.metrics_file, fetched, *map(Path, result.plots)):
        if path and os.path.exists(path) and (since is None or os.path.getmtime(path) >= since - 1.0):
            os.remove(path)
