"""Reading embedding rasters by windows and writing outputs atomically.

Every raster is seen north-up: bottom-up files (positive y pixel size, as the public
AEF COGs are stored) are flipped on read, so callers never meet the difference.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import RasterioError, RasterioIOError

try:  # GDAL errors rasterio passes on unwrapped (the class is private, but in every 1.x release)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover
    CPLE_BaseError = RasterioError
# RasterioIOError is no RasterioError in rasterio 1.3 (an OSError only)
GDAL_ERRORS = (RasterioError, RasterioIOError, CPLE_BaseError)
from rasterio.windows import Window

from . import aef
from .errors import InputError, RasterReadError

OUTPUT_NODATA = -9999.0
# Float embeddings are unit-length vectors (components in [-1, 1]); a little slack for
# rounding and resampling, far below anything a scaled or foreign raster would hold.
EMBEDDING_LIMIT = 1.5


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, affine transform and size."""

    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def resolution(self) -> tuple[float, float]:
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return left, top + self.transform.e * self.height, left + self.transform.a * self.width, top

    def window_transform(self, window: Window) -> Affine:
        return self.transform * Affine.translation(window.col_off, window.row_off)


def _north_up(transform: Affine, height: int) -> tuple[Affine, bool]:
    """Return the north-up transform and whether the file stores rows bottom-up."""
    if transform.e > 0:
        return Affine(transform.a, 0.0, transform.c, 0.0, -transform.e,
                      transform.f + transform.e * height), True
    return transform, False


def check_projected(path: object, crs: Optional[CRS], transform: Affine) -> None:
    """Refuse rasters whose grid is not in metres or not axis-aligned."""
    if crs is None:
        raise InputError(path, "has no coordinate reference system",
                         "Assign one, e.g. gdal_edit.py -a_srs EPSG:32630 FILE")
    if crs.is_geographic:
        raise InputError(path, f"is in a geographic CRS ({crs.to_string()}) but 10 m work needs metres",
                         "Reproject it to its UTM zone, e.g. gdalwarp -t_srs EPSG:32630 -tr 10 10 -r near IN OUT")
    if transform.b != 0 or transform.d != 0:
        raise InputError(path, "has a rotated or sheared geotransform",
                         "Warp it to a north-up grid with gdalwarp first")


def open_raster(path: str | os.PathLike) -> rasterio.DatasetReader:
    """Open any GDAL raster, turning GDAL's failure into a one-line InputError."""
    if not Path(path).exists() and "://" not in str(path) and not str(path).startswith("/vsi"):
        raise InputError(path, "does not exist", "Check the path")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unknown GDAL error"
        raise RasterReadError(path, f"cannot be read as a raster ({reason})",
                              "Give a GeoTIFF or another raster GDAL can open") from None


def unreadable(path: object, exc: BaseException) -> RasterReadError:
    """The one-line error for a raster whose header opened but whose pixels cannot be read."""
    reason = " ".join(str(exc).split()).replace("Read or write failed. ", "").replace(f"{path}, ", "")
    return RasterReadError(path, f"cannot be read: GDAL failed on its pixel data ({reason or type(exc).__name__})",
                           "The file is truncated or corrupt: copy or fetch it again")


def read_or_fail(ds: rasterio.DatasetReader, path: object, *args, **kwargs) -> np.ndarray:
    """``ds.read(*args, **kwargs)``, turning GDAL's read failure (truncated or corrupt data) into one line."""
    try:
        return ds.read(*args, **kwargs)
    except GDAL_ERRORS as exc:
        raise unreadable(path, exc) from None


class EmbeddingRaster:
    """A 64-band embeddings raster (AEF int8 or float), read by north-up windows."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        self._raw: Optional[np.ndarray] = None  # read_model_input's int8 buffer, reused window after window
        self._ds = open_raster(path)
        try:
            self._validate()
        except Exception:
            self._ds.close()
            raise
        transform, self.bottom_up = _north_up(self._ds.transform, self._ds.height)
        self.grid = Grid(self._ds.crs, transform, self._ds.width, self._ds.height)

    def _validate(self) -> None:
        ds = self._ds
        if ds.count != aef.N_BANDS:
            raise InputError(self.path, f"has {ds.count} band(s) but embeddings need {aef.N_BANDS} (A00..A63)",
                             "Give an AlphaEarth embeddings raster with all 64 bands")
        dtype = np.dtype(ds.dtypes[0])
        if dtype == np.int8:
            self.quantised = True
        elif dtype.kind == "f":
            self.quantised = False
        else:
            raise InputError(self.path, f"has data type {dtype.name}; embeddings are int8 (AEF) or float",
                             "Give the AEF int8 tiles or float embeddings exported from Earth Engine")
        check_projected(self.path, ds.crs, ds.transform)

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def height(self) -> int:
        return self.grid.height

    def read(self, window: Window) -> np.ndarray:
        """Float32 embeddings (64, h, w) of a north-up window; nodata pixels are NaN.

        Parts of the window outside the raster are NaN too, so callers may ask for
        padded windows at the edges.
        """
        window = Window(int(window.col_off), int(window.row_off), int(window.width), int(window.height))
        out = np.full((aef.N_BANDS, window.height, window.width), np.nan, dtype=np.float32)
        inner = window.intersection(Window(0, 0, self.width, self.height)) if self._overlaps(window) else None
        if inner is None:
            return out
        inner = Window(int(inner.col_off), int(inner.row_off), int(inner.width), int(inner.height))
        file_window = inner
        if self.bottom_up:
            file_window = Window(inner.col_off, self.height - inner.row_off - inner.height,
                                 inner.width, inner.height)
        raw = read_or_fail(self._ds, self.path, window=file_window)
        if self.bottom_up:
            raw = raw[:, ::-1, :]
        values = self._to_float(raw)
        self._check_range(values, inner)
        r0, c0 = inner.row_off - window.row_off, inner.col_off - window.col_off
        out[:, r0:r0 + inner.height, c0:c0 + inner.width] = values
        return out

    def window_block_bytes(self, height: int, width: int) -> int:
        """Bytes of the stored blocks (all bands) a ``height`` x ``width`` window can touch at
        worst: what GDAL decodes for it, and what its block cache must hold for the next
        window to reuse the blocks they share."""
        block_h, block_w = self._ds.block_shapes[0]
        rows = min(-(-(height - 1) // block_h) + 1, -(-self.height // block_h))
        cols = min(-(-(width - 1) // block_w) + 1, -(-self.width // block_w))
        return rows * cols * block_h * block_w * self._ds.count * np.dtype(self._ds.dtypes[0]).itemsize

    def reads_directly(self, window: Window) -> bool:
        """Whether ``read_model_input`` reads this window straight from the int8 file (AEF
        int8 and inside the raster), so any share of the bands can be read on its own."""
        return (self.quantised and window.col_off >= 0 and window.row_off >= 0
                and window.col_off + window.width <= self.width and window.row_off + window.height <= self.height)

    def read_model_input(self, window: Window, out: np.ndarray, bands: Optional[slice] = None) -> np.ndarray:
        """Fill ``out`` (float32, 64 x h x w) with what a model is given for a north-up window
        and return the window's validity mask (``valid_mask`` of ``read``).

        Missing pixels (nodata, NaN, +-Inf, outside the raster) are 0 in ``out``, since a
        NaN would spread through the convolutions into the neighbouring pixels. An int8
        window inside the raster is de-quantised straight into ``out`` in one table pass:
        the reader's work per tile is then a small fraction of the model's. There,
        ``bands`` (a slice of the 64) reads only those into ``out`` (their count x h x w)
        and the mask is theirs: threads can share a window, each on its own handle.
        """
        if not self.reads_directly(window):
            if bands is not None:
                raise ValueError(f"{self.path}: a share of the bands is read only where reads_directly holds")
            out[...] = self.read(window)
            mask = valid_mask(out)
            np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
            return mask
        row = self.height - window.row_off - window.height if self.bottom_up else window.row_off
        indexes = list(range(bands.start + 1, bands.stop + 1)) if bands is not None else None
        if self._raw is None or self._raw.shape != out.shape:
            self._raw = np.empty(out.shape, dtype=np.int8)
        raw = read_or_fail(self._ds, self.path, indexes, window=Window(window.col_off, row, window.width,
                                                                       window.height), out=self._raw)
        if self.bottom_up:
            raw = raw[:, ::-1, :]
        aef.dequantise(raw, out=out, nodata="zero")
        return raw.min(axis=0) != aef.NODATA_INT8  # -128 is int8's least value: half the cost of all(!=)

    def _overlaps(self, window: Window) -> bool:
        return (window.col_off < self.width and window.row_off < self.height
                and window.col_off + window.width > 0 and window.row_off + window.height > 0)

    def _to_float(self, raw: np.ndarray) -> np.ndarray:
        if self.quantised:
            return aef.dequantise(raw)
        values = raw.astype(np.float32, copy=False)
        nodata = self._ds.nodata
        if nodata is not None and np.isfinite(nodata):
            values = np.where(raw == nodata, np.float32(np.nan), values)
        # +-Inf is no embedding: nodata like NaN (the model must never see it; it would
        # spread through the convolutions as NaN into the neighbouring pixels)
        return np.where(np.isfinite(values), values, np.float32(np.nan))

    def _check_range(self, values: np.ndarray, window: Window) -> None:
        """Refuse float embeddings far outside [-1, 1] (scaled, or not embeddings at all)."""
        if self.quantised:
            return  # int8 de-quantises into [-1, 1] by construction
        flat = values.ravel()
        peak = max(float(np.fmax.reduce(flat, initial=-np.inf)), -float(np.fmin.reduce(flat, initial=np.inf)))
        if peak > EMBEDDING_LIMIT:  # NaN-only windows give -inf
            raise InputError(self.path, f"has embedding values up to {peak:.4g} (in the window at column "
                             f"{window.col_off}, row {window.row_off}) but AlphaEarth embeddings lie in [-1, 1]",
                             "Give the embeddings as exported (unit-length, not scaled), or AEF int8 tiles; "
                             "mark missing pixels as NaN or with the raster's nodata value")

    def close(self) -> None:
        self._ds.close()

    def __enter__(self) -> "EmbeddingRaster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def valid_mask(embeddings: np.ndarray) -> np.ndarray:
    """Pixels whose 64 components are all finite."""
    return np.isfinite(embeddings).all(axis=0)


def iter_windows(width: int, height: int, block: int) -> Iterator[Window]:
    """Row-major windows of at most block x block pixels covering a grid."""
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield Window(col, row, min(block, width - col), min(block, height - row))


def float_profile(grid: Grid, count: int = 1) -> dict:
    """GeoTIFF profile for outputs: tiled, DEFLATE with float predictor, nodata set."""
    return {
        "driver": "GTiff", "dtype": "float32", "count": count, "nodata": OUTPUT_NODATA,
        "width": grid.width, "height": grid.height, "crs": grid.crs, "transform": grid.transform,
        "tiled": True, "blockxsize": 256, "blockysize": 256,
        "compress": "deflate", "predictor": 3, "zlevel": 6, "BIGTIFF": "IF_SAFER",
    }


def check_output_path(path: str | os.PathLike, *inputs: str | os.PathLike) -> Path:
    """Refuse an output that would overwrite an input, is a folder, or lands in a missing or read-only folder."""
    check_outputs({"the output": path}, inputs=list(inputs))
    return Path(path).resolve()


OutputSpec = Union[Mapping[str, Any], Sequence[tuple[str, Any]]]


def _labelled(items: Optional[OutputSpec]) -> list[tuple[str, Path]]:
    """(label, path) pairs from a mapping or pairs; empty paths are dropped."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items or ())
    return [(label, Path(path)) for label, path in pairs if path not in (None, "")]


def _same_path(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _check_writable_folder(path: Path, folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(path, f"cannot be written: folder {folder} is read-only or not writable by you",
                         "Choose another folder or change its permissions")


def check_outputs(files: Optional[OutputSpec] = None, *, inputs: Optional[Iterable[Any] | OutputSpec] = None,
                  folders: Optional[OutputSpec] = None) -> None:
    """Check every output of one run against the others and against the inputs, before any work.

    ``files`` and ``folders`` map a label (``--out``, ``OUTPUT``, "the difference raster")
    to a path; ``inputs`` are paths (or labelled paths) the run reads. Refused with one
    line: an output that is also an input, two outputs at the same path (the second would
    replace the first), a file output that is an existing folder (or a folder output that
    is an existing file), a missing or read-only folder, an output inside a folder output.
    Folder outputs may be new (their nearest existing parent must be writable); whether an
    existing folder must be empty is the caller's rule.
    """
    file_outputs, folder_outputs = _labelled(files), _labelled(folders)
    if inputs is None:
        sources: list[tuple[str, Path]] = []
    elif isinstance(inputs, Mapping):
        sources = _labelled(inputs)
    else:
        sources = [("input", Path(p)) for p in inputs if p not in (None, "")]
    outputs = file_outputs + folder_outputs
    for label, path in file_outputs:
        for folder_label, folder in folder_outputs:
            if folder.resolve() in path.resolve().parents:
                raise InputError(path, f"is inside {folder_label} ({folder}), which this run writes as a whole",
                                 "Give it a path outside that folder")
    for i, (label, path) in enumerate(outputs):
        for source_label, source in sources:
            if _same_path(path, source):
                also = "an input" if source_label == "input" else f"the input {source_label}"
                raise InputError(path, f"is also {also} and would be overwritten", "Choose another output path")
        for other_label, other in outputs[i + 1:]:
            if _same_path(path, other):
                raise InputError(path, f"is given for both {label} and {other_label}; one would replace the other",
                                 "Give each output its own path")
    for label, path in file_outputs:
        if path.is_dir():
            raise InputError(path, f"is a directory but {label} is a file", "Give a file name, e.g. "
                             f"{path / ('output' + (path.suffix or '.tif'))}")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise InputError(path, f"cannot be written: folder {parent} does not exist",
                             "Create the folder or choose another output path")
        _check_writable_folder(path, parent)
    for label, path in folder_outputs:
        if path.exists() and not path.is_dir():
            raise InputError(path, f"is an existing file but {label} is a folder", "Give a new folder name")
        _check_writable_folder(path, path if path.is_dir() else _existing_folder(path.parent))


def _existing_folder(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a folder, else its nearest existing parent folder."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes an unprivileged write can still use on the filesystem holding ``path``."""
    return shutil.disk_usage(_existing_folder(path)).free


def _megabytes(n: float) -> str:
    if n >= 10e6:
        return f"{n / 1e6:,.0f} MB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def disk_full_error(path: str | os.PathLike, too_large: bool = False) -> InputError:
    """The one-line error for a write that ran out of space (ENOSPC, EDQUOT) or past a size limit (EFBIG)."""
    try:
        free = _megabytes(free_bytes(path))
    except OSError:
        free = "unknown"
    if too_large:
        return InputError(path, f"cannot be written: the file grew past the largest size this filesystem or "
                                f"process allows ({free} free)",
                          "Write to another filesystem, or raise the file size limit (ulimit -f)")
    return InputError(path, f"cannot be written: the disk is full ({free} free)",
                      "Free space or choose another folder")


def ensure_free_space(path: str | os.PathLike, needed_bytes: float, what: str) -> None:
    """Refuse, before any work, to write ``what`` (about ``needed_bytes``) where it cannot fit.

    ``path`` is the output file or its folder (the nearest existing folder is measured).
    Give a conservative estimate: a refusal here must mean the write could not succeed;
    write errors during the write are caught by ``atomic_write`` in any case.
    """
    free = free_bytes(path)
    if needed_bytes > free:
        raise InputError(path, f"cannot be written: {what} needs about {_megabytes(needed_bytes)} "
                               f"but only {_megabytes(free)} is free there",
                         "Free space or choose another folder")


def raster_bytes(width: int, height: int, count: int = 1, dtype: str = "float32",
                 compressed: bool = True) -> int:
    """A size estimate for a GeoTIFF: raw pixels, or a quarter of them when it is compressed.

    A quarter is a floor rather than a forecast (DEFLATE with a predictor rarely does
    better on heights or embeddings), so ``ensure_free_space`` refuses only writes that
    cannot fit.
    """
    raw = int(width) * int(height) * int(count) * np.dtype(dtype).itemsize
    return raw // 4 if compressed else raw


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (and put it back)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temporary file or folder the mode a plain ``open``/``mkdir`` would have given it.

    ``mkstemp`` makes files 0600 and ``mkdtemp`` folders 0700 whatever the umask; renamed
    into place they would stay private. Every temporary-then-rename writer calls this.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def check_new_folder(path: str | os.PathLike, what: str) -> Path:
    """Refuse a folder output that is an existing file or a folder with something in it.

    Runs that write a whole folder (train, evaluate, demo) never mix their files with
    what is already there, nor replace any of it.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(out, f"is an existing file but {what} is written as a folder", "Give a new folder name")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(out, "already exists and is not empty", f"Choose a new folder for {what}")
    _check_writable_folder(out, out if out.is_dir() else _existing_folder(out.parent))
    return out


# ---- temporary files renamed into place -------------------------------------------------------
#
# A temporary file or folder is named ``.<name>.<random>.partial-<host>-<pid><suffix>`` so a later
# run can tell whose it is: the partials of a process that is gone (killed by SIGKILL, a power
# cut) are removed by the next run writing into that folder (``remove_stale_partials``).

_PARTIAL = re.compile(r"^\..+\.partial-(?P<host>[A-Za-z0-9_-]+?)-(?P<pid>\d+)(?:\.|$)")
_LEGACY_PARTIAL = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.partial(?:\.[A-Za-z0-9]+)*$")  # before pids were named
OTHER_HOST_PARTIAL_AGE_S = 7 * 24 * 3600  # partials of another machine (a shared folder): only when this old
LEGACY_PARTIAL_AGE_S = 3600
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_WORDS = ("no space left", "disk full", "quota exceeded")
_TOO_LARGE_WORDS = ("file too large",)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"


def partial_tag() -> str:
    """The ``.partial-<host>-<pid>`` part of this process's temporary names."""
    return f".partial-{_host()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return True  # cannot tell (e.g. Windows quirks): keep the file
    return True


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that dead runs left in ``folder``; return them.

    A partial of this machine is stale when its process is gone; one of another machine
    (a shared folder) only when it is older than a week; an unnamed one of earlier
    versions when it is older than an hour. Live runs' partials are never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now, host = time.time(), _host()
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match:
            pid = int(match.group("pid"))
            if match.group("host") == host:
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = age > OTHER_HOST_PARTIAL_AGE_S
        else:
            stale = bool(_LEGACY_PARTIAL.match(entry.name)) and age > LEGACY_PARTIAL_AGE_S
        if not stale:
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass  # another run removed it first, or it is not ours to remove
    return removed


_SWEPT: set[str] = set()


def remove_stale_partials_once(folder: str | os.PathLike) -> None:
    """``remove_stale_partials`` the first time this process writes into ``folder`` (a tile cache folder
    is written once per tile: one sweep is enough)."""
    key = os.path.abspath(folder)
    if key not in _SWEPT:
        _SWEPT.add(key)
        remove_stale_partials(folder)


def _refuse_unwritable(path: Path, exc: OSError) -> InputError:
    if exc.errno in DISK_FULL_ERRNOS:
        return disk_full_error(path, too_large=exc.errno == errno.EFBIG)
    if exc.errno == errno.ENOENT:
        return InputError(path, f"cannot be written: folder {path.parent} does not exist",
                          "Create the folder or choose another output path")
    return InputError(path, f"cannot be written: folder {path.parent} is read-only or not writable by you "
                            f"({exc.strerror or exc})", "Choose another folder or change its permissions")


def make_partial_dir(out: str | os.PathLike) -> Path:
    """A temporary folder beside ``out`` (for outputs that are folders, or scratch files), named as partials are.

    The caller renames it into place or removes it; a run killed outright leaves it to
    the next run's ``remove_stale_partials``.
    """
    out = Path(out)
    remove_stale_partials(out.parent)
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=partial_tag(), dir=out.parent))
    except OSError as exc:
        raise _refuse_unwritable(out, exc) from None
    honour_umask(folder, directory=True)
    return folder


class _GdalErrors(logging.Handler):
    """Collects the errors GDAL signals in this thread while an output is written.

    rasterio routes GDAL's errors to the ``rasterio._env`` logger (rasterio 1.3 logs
    CE_Failure at INFO, "GDAL signalled an error"); GDAL's own write failures (a full
    disk while a TIFF directory is written at close) are never raised, only signalled.
    """

    LOGGERS = ("rasterio._env", "rasterio._err")  # rasterio 1.3; rasterio 1.4 logs errors met during I/O in _err

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread:
            return
        text = record.getMessage()
        if record.levelno >= logging.ERROR or "signalled an error" in text:
            self.messages.append(text)

    def __enter__(self) -> "_GdalErrors":
        self.loggers = [(logging.getLogger(name), logging.getLogger(name).level) for name in self.LOGGERS]
        for logger, _ in self.loggers:
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, level in self.loggers:
            logger.removeHandler(self)
            logger.setLevel(level)


def _gdal_message(text: str) -> str:
    match = re.search(r"msg=['\"](.*)['\"]\s*$", text)
    text = match.group(1) if match else text
    return " ".join(text.split()).rstrip(".")


def _no_room(folder: Path) -> bool:
    """Whether a small write into ``folder`` fails for lack of space (GDAL >= 3.10 with libtiff 4.7
    prints libtiff's ENOSPC message to stderr instead of signalling it, so only the errno can tell)."""
    try:
        with tempfile.TemporaryFile(dir=folder) as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return False


def _write_failed(out: Path, messages: list[str], reason: str = "") -> Exception:
    """The one-line error for an output GDAL could not write (a full disk, most often)."""
    texts = [_gdal_message(m) for m in messages] + ([reason] if reason else [])
    for text in texts:
        if _space_problem(text) is not None:
            return _DiskFull(_space_problem(text))
    if _no_room(out.parent):
        return _DiskFull("full")
    detail = texts[0] if texts else "unknown error"
    return InputError(out, f"could not be written completely (GDAL: {detail[:200]})",
                      "Check that the folder has free space and is writable, then run again")


def _from_gdal(exc: BaseException) -> bool:
    """An error rasterio raised for GDAL (its classes move between modules across versions)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] == "rasterio"


def _space_problem(what: BaseException | str) -> Optional[str]:
    """"too large" (EFBIG), "full" (ENOSPC, EDQUOT) or None, from an exception or a GDAL message."""
    if isinstance(what, OSError) and what.errno in DISK_FULL_ERRNOS:
        return "too large" if what.errno == errno.EFBIG else "full"
    if isinstance(what, BaseException) and not _from_gdal(what):
        return None
    text = str(what).lower()
    if any(word in text for word in _TOO_LARGE_WORDS):
        return "too large"
    return "full" if any(word in text for word in _DISK_FULL_WORDS) else None


def verify_output(path: str | os.PathLike, kind: str) -> None:
    """Reopen a just-written file and read it all; raise ``ValueError`` if it is not whole.

    ``kind`` is "raster" (every block of every band is read back), "json" (parsed) or
    "file" (nothing to check beyond the write itself).
    """
    if kind == "json":
        json.loads(Path(path).read_text(encoding="utf-8"))
    elif kind == "raster":
        with rasterio.open(path) as ds:
            for _, window in ds.block_windows(1):
                ds.read(window=window)


def _output_kind(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix in (".tif", ".tiff", ".vrt", ".img"):
        return "raster"
    return "json" if suffix == ".json" else "file"


def _fsync(path: str | os.PathLike, directory: bool = False) -> None:
    """Push a file (or a folder's entries) to the disk; delayed write errors (ENOSPC on NFS) surface here."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return  # folders cannot be opened on some systems (Windows): nothing to sync
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if not directory or exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, kind: Optional[str] = None) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it into place only once it is whole.

    Before the rename the temporary file must have been written without any GDAL error,
    be synced to disk, and reopen and read back completely (``verify_output``; ``kind``
    defaults from the suffix: rasters, JSON, other files). Otherwise nothing is renamed,
    the earlier file at ``path`` is untouched, the temporary file is removed and the
    error is one line (a full disk says so, with the space left). A crash, cancellation,
    Ctrl-C or SIGTERM (the CLI turns it into KeyboardInterrupt) leaves nothing; a run
    killed outright leaves a partial that the next run in the folder removes.
    The output gets the usual mode for the umask (not mkstemp's 0600).
    """
    out = Path(path)
    remove_stale_partials(out.parent)
    try:
        with replace_when_done(out) as tmp, rasterio.Env(), _GdalErrors() as gdal_errors:
            try:
                yield tmp
            except Exception as exc:  # noqa: BLE001 - classified, then raised again
                if _space_problem(exc):
                    raise _DiskFull(_space_problem(exc)) from None
                if _from_gdal(exc) and (gdal_errors.messages or exc.__cause__ is not None):
                    cause = exc.__cause__
                    raise _write_failed(out, gdal_errors.messages, str(cause or exc)) from None
                raise
            if gdal_errors.messages:
                raise _write_failed(out, gdal_errors.messages)
            try:
                _fsync(tmp)
                verify_output(tmp, kind or _output_kind(out))
            except Exception as exc:  # noqa: BLE001 - whatever reading it back raised, it is not whole
                if _space_problem(exc):
                    raise _DiskFull(_space_problem(exc)) from None
                raise _write_failed(out, gdal_errors.messages, f"{type(exc).__name__}: {exc}") from None
            if gdal_errors.messages:  # reading it back signalled errors: blocks are missing
                raise _write_failed(out, gdal_errors.messages)
    except _DiskFull as exc:  # the free space is measured now that the partial is gone
        raise disk_full_error(out, too_large=exc.kind == "too large") from None
    with contextlib.suppress(OSError):  # the rename itself is durable once the folder is synced
        _fsync(out.parent, directory=True)


@contextlib.contextmanager
def replace_when_done(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (named as partials are); rename it onto ``path``
    when the block ends, remove it (and any GDAL sidecar) when the block raises.

    The one temporary-then-rename step of every writer: outputs (``atomic_write`` adds the
    checks), cached tiles, blocks and indexes. The file gets the umask's usual mode.
    """
    out = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=partial_tag() + out.suffix, dir=out.parent)
    except OSError as exc:
        raise _refuse_unwritable(out, exc) from None
    os.close(fd)
    try:
        honour_umask(tmp)
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        for leftover in (tmp, tmp + ".aux.xml"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
        raise


class _DiskFull(Exception):
    """Raised inside ``atomic_write`` so the free space is reported after the partial is removed."""

    def __init__(self, kind: str = "full") -> None:
        super().__init__(kind)
        self.kind = kind


def describe_band(dst: rasterio.io.DatasetWriter, description: str, units: str, **tags: str) -> None:
    """Band description, units and dataset tags (attribution always included)."""
    dst.set_band_description(1, description)
    dst.update_tags(1, UNITS=units)
    try:
        dst.units = (units,) * dst.count
    except (AttributeError, ValueError):
        pass
    dst.update_tags(ATTRIBUTION=aef.ATTRIBUTION, SOFTWARE="AlphaEarth Height", **tags)


def grow_grid(grid: Grid, pixels: int, within: Optional[Grid] = None) -> Grid:
    """``grid`` grown by ``pixels`` on every side (the context a model sees past an AOI's edge).

    With ``within`` (a grid on the same pixel lattice, e.g. a local raster's own grid)
    the grown grid is clipped to it, so no context is invented past the data's edge.
    """
    if pixels < 0:
        raise ValueError(f"cannot grow a grid by {pixels} px")
    if within is None:
        return Grid(grid.crs, grid.transform * Affine.translation(-pixels, -pixels),
                    grid.width + 2 * pixels, grid.height + 2 * pixels)
    col, row = _offset_in(within, grid)
    col0, row0 = max(0, col - pixels), max(0, row - pixels)
    col1 = min(within.width, col + grid.width + pixels)
    row1 = min(within.height, row + grid.height + pixels)
    window = Window(col0, row0, col1 - col0, row1 - row0)
    return Grid(within.crs, within.window_transform(window), int(window.width), int(window.height))


def _offset_in(outer: Grid, inner: Grid) -> tuple[int, int]:
    """Whole-pixel (col, row) of ``inner``'s top-left corner in ``outer``; both on one lattice."""
    t, u = outer.transform, inner.transform
    col, row = ~t * (u.c, u.f)
    if (outer.crs != inner.crs or (t.a, t.b, t.d, t.e) != (u.a, u.b, u.d, u.e)
            or abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6):
        raise ValueError(f"grid {u} ({inner.crs}) is not on the pixel lattice of {t} ({outer.crs})")
    return round(col), round(row)


def crop_to_grid(src_path: str | os.PathLike, out_path: str | os.PathLike, grid: Grid,
                 block: int = 1024) -> Path:
    """Copy the window of a raster that ``grid`` covers into ``out_path``, north-up.

    A bottom-up source (as the public AEF files) is read as north-up, like everywhere
    else (``_north_up``), so the output is north-up whatever the input's row order.

    All bands, data type, nodata, tags and band descriptions are kept; the output gets
    ``grid``'s transform exactly. Band statistics tags (``STATISTICS_*``, ``VALID_PIXELS``,
    as predictions carry) are computed again for the window. Streams by blocks; written
    atomically.
    """
    out = check_output_path(out_path, src_path)
    with open_raster(src_path) as src:
        transform, bottom_up = _north_up(src.transform, src.height)
        col, row = _offset_in(Grid(src.crs, transform, src.width, src.height), grid)
        if col < 0 or row < 0 or col + grid.width > src.width or row + grid.height > src.height:
            raise ValueError(f"grid {grid} is not inside {src_path}")
        profile = dict(src.profile)
        profile.update(width=grid.width, height=grid.height, transform=grid.transform, BIGTIFF="IF_SAFER")
        if profile.get("compress"):
            profile["predictor"] = 3 if np.dtype(src.dtypes[0]).kind == "f" else 2
        with atomic_write(out) as tmp:
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.update_tags(**src.tags())
                restat = []
                for band in range(1, src.count + 1):
                    if src.descriptions[band - 1]:
                        dst.set_band_description(band, src.descriptions[band - 1])
                    tags = src.tags(band)
                    if any(_is_stat(key) for key in tags):
                        restat.append(band)
                    dst.update_tags(band, **{k: v for k, v in tags.items() if not _is_stat(k)})
                sums = {band: [0, 0.0, 0.0, np.inf, -np.inf] for band in restat}  # n, sum, sum sq, min, max
                if any(src.units):
                    try:
                        dst.units = src.units
                    except (AttributeError, ValueError):
                        pass
                for window in iter_windows(grid.width, grid.height, block):
                    top = window.row_off + row
                    if bottom_up:  # north-up rows [top, top + h) are file rows [H - top - h, H - top), reversed
                        top = src.height - top - window.height
                    values = src.read(window=Window(window.col_off + col, top, window.width, window.height))
                    if bottom_up:
                        values = values[:, ::-1, :]
                    dst.write(values, window=window)
                    for band in restat:
                        v = values[band - 1].astype(np.float64)
                        v = v[np.isfinite(v) & (v != src.nodata)] if src.nodata is not None else v[np.isfinite(v)]
                        if v.size:
                            acc = sums[band]
                            acc[0] += v.size
                            acc[1] += v.sum()
                            acc[2] += (v * v).sum()
                            acc[3], acc[4] = min(acc[3], v.min()), max(acc[4], v.max())
                for band, (n, total, squares, low, high) in sums.items():
                    if n:
                        mean = total / n
                        std = max(squares / n - mean * mean, 0.0) ** 0.5
                        dst.update_tags(band, STATISTICS_MINIMUM=f"{low:.3f}", STATISTICS_MAXIMUM=f"{high:.3f}",
                                        STATISTICS_MEAN=f"{mean:.3f}", STATISTICS_STDDEV=f"{std:.3f}",
                                        VALID_PIXELS=str(n))
    return out


def _is_stat(tag: str) -> bool:
    return tag.startswith("STATISTICS_") or tag == "VALID_PIXELS"


# Height rasters (predictions, differences, references on a grid): one band of metres,
# streamed by blocks of this many pixels a side so memory stays flat for any area.
HEIGHT_BLOCK = 1024
NOT_A_PREDICTION_FIX = "Give the output of 'alphaearth-height predict'"


def read_height_grid(path: str | os.PathLike) -> tuple[rasterio.DatasetReader, Grid]:
    """Open a single-band, north-up height raster (a prediction) and describe its grid.

    North-up only: outputs are written on this grid block by block, so a bottom-up file
    would need every window flipped; predictions are never stored that way.
    """
    src = open_raster(path)
    if src.crs is None or src.transform.e > 0 or src.transform.b or src.transform.d:
        src.close()
        raise InputError(path, "is not a north-up georeferenced raster", NOT_A_PREDICTION_FIX)
    if src.count != 1:
        src.close()
        raise InputError(path, f"has {src.count} bands but a predicted height raster has one", NOT_A_PREDICTION_FIX)
    return src, Grid(src.crs, src.transform, src.width, src.height)


def read_height(path: str | os.PathLike, max_side: Optional[int] = None) -> np.ndarray:
    """A single-band height raster, whole, as float32 north-up with NaN where it has no data.

    With ``max_side`` it is decimated on read so neither side exceeds it (a picture of an
    area too large to hold at full resolution).
    """
    with open_raster(path) as src:
        if src.count != 1:
            raise InputError(path, f"has {src.count} bands but a height raster has one", NOT_A_PREDICTION_FIX)
        scale = max(src.width, src.height) / max_side if max_side else 1.0
        shape = (max(1, int(src.height / scale)), max(1, int(src.width / scale))) if scale > 1 else None
        values = read_or_fail(src, path, 1, masked=True, out_shape=shape).astype(np.float32).filled(np.nan)
        return values[::-1] if src.transform.e > 0 else values


def height_blocks(src: rasterio.DatasetReader, block: int = HEIGHT_BLOCK) -> Iterator[tuple[Window, np.ndarray]]:
    """Every block of band 1 of an open north-up height raster: (window, float32 heights with NaN for nodata)."""
    for window in iter_windows(src.width, src.height, block):
        values = read_or_fail(src, src.name, 1, window=window, masked=True)
        yield window, values.astype(np.float32).filled(np.nan)


def map_height_raster(src_path: str | os.PathLike, out_path: str | os.PathLike,
                      fn: Callable[[np.ndarray, Window], np.ndarray], description: str, *,
                      tags: Optional[Mapping[str, str]] = None,
                      before_commit: Optional[Callable[[], None]] = None) -> None:
    """Write ``fn`` of every block of a height raster, on its grid, as a float height raster.

    ``fn`` gets each block (float32, NaN for nodata) and its window and returns heights in
    metres, NaN where there are none (written as OUTPUT_NODATA). The output is written
    atomically; ``before_commit`` runs once every block is written, and raising there
    leaves no output (an earlier file at ``out_path`` untouched). The band is described
    and tagged like every output (``describe_band``).
    """
    src, grid = read_height_grid(src_path)
    with src, atomic_write(out_path) as tmp:
        with rasterio.open(tmp, "w", **float_profile(grid)) as dst:
            describe_band(dst, description, "m", **dict(tags or {}))
            for window, values in height_blocks(src):
                heights = fn(values, window)
                dst.write(np.where(np.isfinite(heights), heights, OUTPUT_NODATA).astype(np.float32), 1, window=window)
        if before_commit is not None:
            before_commit()
