"""One height-mapping job: fetch embeddings -> prediction -> (difference, metrics, plots).

The dock's task runs it, in the worker process (core.worker). Processing and the CLI
call the same pieces it is made of (core.fetch, core.inference, core.compare) one step
at a time, so there is one code path from an embedding source to a height layer.

An AOI is predicted with ``context`` pixels of embeddings around it (the model needs to
see past the edge: without it, heights within a few pixels of the edge are off by
~15 m), then cropped to the AOI's own grid window. Margin files live in a hidden scratch
folder in the output folder that is always removed.

With ``dask_workers`` or ``dask_scheduler`` only the prediction step changes: chunks on
a Dask cluster (core.distributed), assembled into the same GeoTIFF, so the crop, the
comparison and the dock's layers do not know the difference.

This module imports no torch, rasterio or numpy at import time (they are imported where
used), so a light process can build jobs, read results and send both as JSON
(``to_dict``/``from_dict``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from .aoi import AreaOfInterest
from .cancel import Cancelled, CancelFn
from .errors import InputError

if TYPE_CHECKING:
    from .inference import PredictionResult
    from .models import ModelPackage

Progress = Callable[[float], None]
FETCH_END, PREDICT_END = 20.0, 90.0  # progress: fetch 0-20 %, predict 20-90 %, compare to 100 %
DEFAULT_CONTEXT = 64  # px of context around an AOI when neither the job nor the model card says
DASK_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss")  # Dask's schemes that reach another process
_SCHEDULER = re.compile(r"(?:(?P<scheme>[A-Za-z]+)://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})")


@dataclass
class HeightJob:
    embeddings: str                       # source "local": the raster; remote sources: unused ("")
    out_dir: str
    model: Optional[str] = None           # None: the bundled model
    aoi: Optional[AreaOfInterest] = None  # None: the whole local raster, used as is
    reference: Optional[str] = None
    name: str = "height"
    device: str = "auto"
    backend: str = "auto"                 # core.choices.BACKENDS: ONNX Runtime on CPU, torch on GPUs
    tile: Optional[int] = None
    overlap: Optional[int] = None
    batch_size: int = 4
    source: str = "local"                 # a core.fetch source: local, cog or earthengine
    year: int = 2020
    source_options: dict[str, Any] = field(default_factory=dict)  # e.g. project, base_url
    cache_dir: Optional[str] = None       # None: core.fetch's default tile cache
    terrain: Optional[str] = None         # coarse terrain raster, or "copernicus-30"/"copernicus-90" (fetched
    #                                       for the area into the cache), for models trained relative to one
    context: Optional[int] = None         # px fetched and predicted around the AOI, then cropped off;
    #                                       None: the model card's inference.context, else 64
    dask_workers: int = 0                 # > 0: predict in chunks on a LocalCluster of that many processes
    dask_scheduler: str = ""              # tcp://HOST:PORT: predict in chunks on that Dask cluster (its workers
    #                                       must see out_dir, the model and the embeddings at the same paths)
    dask_chunk_size: Optional[int] = None  # px a side of a chunk on Dask; None: core.distributed's default

    @property
    def uses_dask(self) -> bool:
        """Whether the prediction runs on a Dask cluster (core.distributed) rather than in this process."""
        return bool(self.dask_workers) or bool((self.dask_scheduler or "").strip())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: paths as strings, the AOI as a dict; ``from_dict`` gives an equal job."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        data["aoi"] = self.aoi.to_dict() if self.aoi is not None else None
        data["source_options"] = {k: _plain(v) for k, v in self.source_options.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeightJob":
        values = dict(data)
        if values.get("aoi") is not None:
            values["aoi"] = AreaOfInterest.from_dict(values["aoi"])
        values["source_options"] = dict(values.get("source_options") or {})
        return cls(**values)


@dataclass
class HeightJobResult:
    predicted: Path
    embeddings: Path        # fetched: the AOI's window only (same grid as ``predicted``)
    fetched: bool = False   # embeddings were written by the job (and go with its other outputs)
    difference: Optional[Path] = None
    metrics_file: Optional[Path] = None
    metrics: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    device: str = ""
    model_name: str = ""
    context: int = 0        # px of context requested around the AOI (less where the data ends)

    _PATHS = ("predicted", "embeddings", "difference", "metrics_file")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (metrics as compare_heights gives them); ``from_dict`` inverts it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in self._PATHS:
            data[key] = os.fspath(data[key]) if data[key] is not None else None
        data["metrics"], data["plots"] = dict(self.metrics), [os.fspath(p) for p in self.plots]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeightJobResult":
        values = dict(data)
        for key in cls._PATHS:
            if values.get(key) is not None:
                values[key] = Path(values[key])
        values["metrics"], values["plots"] = dict(values.get("metrics") or {}), list(values.get("plots") or [])
        return cls(**values)


def check_scheduler_address(text: str) -> str:
    """``text`` stripped when it reads as a Dask scheduler address ([tcp://]HOST:PORT), else a one-line error.

    Checked before a run (in the dock, instantly) because Dask takes 30 s to give up on
    an address it cannot reach, and raises bare ValueErrors for malformed ones.
    """
    address = text.strip()
    match = _SCHEDULER.fullmatch(address)
    scheme = (match.group("scheme") or "tcp").lower() if match else ""
    if match is None or scheme not in DASK_SCHEMES or not 0 < int(match.group("port")) < 65536:
        raise InputError(f"Dask scheduler {address!r}" if address else "Dask scheduler address",
                         "is not an address like tcp://HOST:PORT" if address else "is empty",
                         "Give the address dask-scheduler printed, e.g. tcp://192.168.1.20:8786")
    return address


def _plain(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def safe_name(text: str) -> str:
    """A file-name-safe layer/file stem."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "height"


def run_height_job(job: HeightJob, progress: Optional[Progress] = None,
                   cancel: Optional[CancelFn] = None, package: Optional[ModelPackage] = None) -> HeightJobResult:
    """Run a job; progress gets 0-100. Outputs are named ``<name>_*.tif`` in ``out_dir``.

    With an AOI, the prediction covers exactly the AOI's window of the fetch grid, but
    was computed with ``context`` px around it. A failed or cancelled run removes
    whatever it wrote, fetched embeddings and margin files included.
    """
    from .models import bundled_model_dir, open_package

    report = progress or (lambda value: None)
    out = Path(job.out_dir)
    if not out.is_dir():
        raise InputError(out, "is not an existing folder", "Create the output folder or choose another one")
    if job.aoi is None and job.source != "local":
        raise InputError(f"source {job.source!r}", "needs an area of interest",
                         "Draw an area or give an extent; only a local raster can be used whole")
    if job.context is not None and int(job.context) < 0:
        raise InputError(f"context {job.context}", "is negative", "Give 0 or more pixels (default 64)")
    stem = safe_name(job.name)
    package = package or open_package(job.model or bundled_model_dir())  # torch loads only if the backend is torch
    started = time.time()
    result = HeightJobResult(out / f"{stem}_height.tif", Path(job.embeddings), fetched=job.aoi is not None)
    try:
        with dask_client(job) as client:  # before the fetch: a wrong address must not cost a download first
            if result.fetched:
                result.embeddings = out / f"{stem}_embeddings.tif"
                result.context = context_pixels(job, package)
                prediction = _fetch_and_predict(job, package, result, report, cancel, client)
            else:
                report(FETCH_END)
                prediction = _predict(job, package, result.embeddings, result.predicted, report, cancel, client)
        result.device, result.model_name = prediction.device, package.name
        if job.reference and not (cancel and cancel()):
            _compare(job, result, out / stem)
    except BaseException:
        remove_outputs(result, since=started)
        if job.uses_dask:  # chunks of a failed run: a dock run's name is never used again, so no resume
            shutil.rmtree(Path(f"{result.predicted}.chunks"), ignore_errors=True)
        raise
    report(100.0)
    return result


@contextlib.contextmanager
def dask_client(job: HeightJob) -> Iterator[Optional[Any]]:
    """The job's Dask client (core.distributed.open_client), or None when it predicts in this process.

    A malformed address is refused in one line here; Dask itself would raise a bare
    ValueError, which reads as a crash. Dask's INFO lines (~35 a run: nannies, comms)
    are held back while it runs: they would bury the job's own lines in QGIS's log panel.
    """
    if not job.uses_dask:
        yield None
        return
    from .distributed import open_client

    scheduler = check_scheduler_address(job.dask_scheduler) if (job.dask_scheduler or "").strip() else None
    with contextlib.suppress(ImportError):  # open_client says how to install it
        importlib.import_module("distributed")  # which sets its loggers' levels: ours must come after
    with contextlib.ExitStack() as stack:
        dask_log = logging.getLogger("distributed")
        stack.callback(dask_log.setLevel, dask_log.level)
        dask_log.setLevel(max(dask_log.getEffectiveLevel(), logging.WARNING))
        try:
            client = stack.enter_context(open_client(int(job.dask_workers) or None, scheduler))
        except ValueError as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"Dask scheduler {scheduler!r}", f"is not usable ({exc})",
                             "Give the address dask-scheduler printed, e.g. tcp://192.168.1.20:8786") from None
        yield client


def context_pixels(job: HeightJob, package: ModelPackage) -> int:
    """The job's context, else the model card's ``inference.context``, else 64 px."""
    value = int(job.context) if job.context is not None else package.default("context", DEFAULT_CONTEXT)
    if value < 0:
        raise InputError(f"context {value}", "is negative", "Give 0 or more pixels (default 64)")
    return value


def _fetch_and_predict(job: HeightJob, package: ModelPackage, result: HeightJobResult, report: Progress,
                       cancel: Optional[CancelFn], client: Optional[Any] = None) -> PredictionResult:
    """Fetch the AOI grown by the context (clipped at a local raster's edge), predict, crop to the AOI."""
    from .fetch import context_grids, fetch, source_options
    from .rasters import crop_to_grid, make_partial_dir

    options = source_options(job.source, raster=job.embeddings, **job.source_options)
    aoi_grid, grown = context_grids(job.aoi, job.source, result.context, **options)
    scratch = make_partial_dir(result.predicted.with_name(result.predicted.stem + "-context"))
    try:
        margin = grown != aoi_grid
        # the final names, so tags naming a file (SOURCE_EMBEDDINGS) hold after the crop
        embeddings = Path(scratch) / result.embeddings.name if margin else result.embeddings
        predicted = Path(scratch) / result.predicted.name if margin else result.predicted
        area = AreaOfInterest(*grown.bounds, grown.crs.to_string()) if margin else job.aoi
        fetch(area, job.year, job.source, embeddings, grid=grown, cache_dir=job.cache_dir, cancel=cancel,
              progress=_scaled(report, 0.0, FETCH_END), **options)
        report(FETCH_END)
        prediction = _predict(job, package, embeddings, predicted, report, cancel, client)
        if margin:
            crop_to_grid(predicted, result.predicted, aoi_grid)
            crop_to_grid(embeddings, result.embeddings, aoi_grid)
            prediction.path, prediction.grid = result.predicted, aoi_grid
    finally:  # also on failure and cancel (ignore_errors: never hide the real error)
        shutil.rmtree(scratch, ignore_errors=True)
    return prediction


def _predict(job: HeightJob, package: ModelPackage, embeddings: Path, predicted: Path, report: Progress,
             cancel: Optional[CancelFn], client: Optional[Any] = None) -> PredictionResult:
    if client is not None:
        return _predict_on_dask(job, package, embeddings, predicted, report, cancel, client)
    from .terrain import predict_surface

    return predict_surface(embeddings, package, predicted, terrain=job.terrain, cache_dir=job.cache_dir,
                           tile=job.tile, overlap=job.overlap, batch_size=job.batch_size, device=job.device,
                           backend=job.backend, cancel=cancel,
                           progress=_scaled(report, FETCH_END, PREDICT_END))


def _predict_on_dask(job: HeightJob, package: ModelPackage, embeddings: Path, predicted: Path, report: Progress,
                     cancel: Optional[CancelFn], client: Any) -> PredictionResult:
    """The same prediction in chunks on ``client``'s cluster, assembled into one GeoTIFF at ``predicted``.

    A model trained relative to a coarse terrain gets the job's terrain (a DEM product is
    fetched once, here, into the job's cache). What predict_distributed refuses is its
    one-line InputError. Cancellation is checked as each chunk finishes (a chunk
    cannot be stopped midway); the worker process is killed if that takes too long.
    """
    from .distributed import DEFAULT_CHUNK, predict_distributed
    from .inference import PredictionResult

    scaled = _scaled(report, FETCH_END, PREDICT_END)

    def progress(done: int, total: int) -> None:
        if cancel and cancel():
            raise Cancelled("cancelled")
        scaled(done, total)

    if cancel and cancel():
        raise Cancelled("cancelled")
    done = predict_distributed(embeddings, package.path, predicted, client=client,
                               chunk_size=job.dask_chunk_size or DEFAULT_CHUNK, tile=job.tile, overlap=job.overlap,
                               batch_size=job.batch_size, device=job.device, backend=job.backend,
                               terrain=job.terrain, cache_dir=job.cache_dir, progress=progress)
    where = (f"{job.dask_workers} local Dask workers" if job.dask_workers
             else f"Dask scheduler {(job.dask_scheduler or '').strip()}")
    return PredictionResult(done.path, done.grid, done.chunks, done.seconds,
                            f"{where} ({done.chunks} chunk{'s' if done.chunks != 1 else ''}, {job.device})")


def _compare(job: HeightJob, result: HeightJobResult, prefix: Path) -> None:
    from .compare import compare_heights

    result.difference = prefix.with_name(prefix.name + "_difference.tif")
    result.metrics_file = prefix.with_name(prefix.name + "_metrics.json")
    terrain = None
    if job.terrain:  # the terrain-alone baseline beside the model's figures
        from .rasters import read_height_grid
        from .dem import resolve_terrain

        src, grid = read_height_grid(result.predicted)
        src.close()
        terrain = resolve_terrain(job.terrain, grid, cache_dir=job.cache_dir)
    result.metrics = compare_heights(result.predicted, job.reference, result.difference, result.metrics_file,
                                     plots_prefix=str(prefix), terrain=terrain)
    if terrain:
        from .dem import terrain_label

        result.metrics["baselines"]["terrain alone"]["name"] = terrain_label(job.terrain)
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
