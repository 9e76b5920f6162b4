"""Writing outputs: whole or not at all, checked against each other, cleaned up after signals.

Real subprocesses of the CLI killed by SIGTERM / SIGKILL mid-prediction, real partial
files of dead processes, real GeoTIFFs cut short; the disk-full cases themselves are in
the failure matrix (tests/failure_cases/outputs.py).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from alphaearth_height.plugin.core.errors import InputError
from alphaearth_height.plugin.core.rasters import (atomic_write, check_new_folder, check_outputs, ensure_free_space,
                                                   make_partial_dir, partial_tag, remove_stale_partials)
from conftest import unit_embeddings, write_embeddings

CLI = Path(sys.executable).parent / "alphaearth-height"
PARTIAL = re.compile(r"\.partial")


def _partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if PARTIAL.search(p.name)]


def _raster(path: Path, value: float = 1.0, size: int = 32) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="float32") as dst:
        dst.write(np.full((1, size, size), value, dtype=np.float32))
    return path


# ---- atomic_write: only whole files are renamed into place --------------------------------------

def test_a_raster_that_does_not_reopen_is_not_renamed_over_the_earlier_one(tmp_path):
    target = _raster(tmp_path / "h.tif", 7.0)
    before = target.read_bytes()
    with pytest.raises(InputError, match="could not be written completely") as info:
        with atomic_write(target) as tmp:
            _raster(Path(tmp), 1.0, size=512)
            with open(tmp, "r+b") as fh:  # cut short, as a write into a full disk leaves it
                fh.truncate(4096)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.tif"]


def test_json_output_must_parse(tmp_path):
    target = tmp_path / "m.json"
    with pytest.raises(InputError, match="could not be written completely"):
        with atomic_write(target) as tmp:
            Path(tmp).write_text('{"overall": ')
    assert list(tmp_path.iterdir()) == []


def _shared_libgdal() -> bool:
    """Whether osgeo.gdal and rasterio use one libgdal (Debian's), so osgeo can raise a CPLError rasterio sees."""
    try:
        from osgeo import gdal  # noqa: F401
        maps = Path("/proc/self/maps").read_text()
    except (ImportError, OSError):
        return False
    return len({line.split()[-1] for line in maps.splitlines() if "libgdal" in line}) == 1


@pytest.mark.skipif(not _shared_libgdal(), reason="needs osgeo.gdal on the same libgdal as rasterio")
def test_a_gdal_error_during_the_write_is_raised_not_logged(tmp_path):
    """GDAL signals some write failures only through its error handler: they must stop the rename."""
    target = tmp_path / "h.tif"
    with pytest.raises(InputError, match="could not be written completely") as info:
        with atomic_write(target) as tmp:
            _raster(Path(tmp))
            # an error GDAL signals without raising (it reaches rasterio's handler, as a write error does)
            with rasterio.Env():
                from osgeo import gdal
                raising = gdal.GetUseExceptions()  # QGIS >= 3.34's Processing turns GDAL exceptions on
                gdal.DontUseExceptions()
                try:
                    gdal.Error(gdal.CE_Failure, 1, "TIFFWriteDirectorySec:IO error writing directory")
                finally:
                    if raising:
                        gdal.UseExceptions()
    assert "IO error writing directory" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_the_temporary_name_carries_host_and_pid(tmp_path):
    with atomic_write(tmp_path / "h.tif") as tmp:
        assert Path(tmp).name.startswith(".h.") and partial_tag() in Path(tmp).name
        _raster(Path(tmp))
    assert [p.name for p in tmp_path.iterdir()] == ["h.tif"]


# ---- stale partials ------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_partials_of_dead_processes_go_and_live_ones_stay(tmp_path):
    tag = partial_tag()
    dead = tag.rsplit("-", 1)[0] + f"-{_dead_pid()}"
    files = {
        "dead": tmp_path / f".h.abcd1234{dead}.tif",
        "dead_aux": tmp_path / f".h.abcd1234{dead}.tif.aux.xml",
        "live": tmp_path / f".h.efgh5678{tag}.tif",                       # this process: running
        "other_host": tmp_path / f".h.ijkl9012.partial-elsewhere-{_dead_pid()}.tif",  # recent: kept
        "legacy_new": tmp_path / ".h.mnop3456.partial.tif",              # no pid, recent: kept
        "legacy_old": tmp_path / ".h.qrst7890.partial.tif",              # no pid, a day old: removed
        "user": tmp_path / "h.partial.tif",                               # not ours (not hidden)
    }
    for path in files.values():
        path.write_bytes(b"x")
    old = time.time() - 86400
    os.utime(files["legacy_old"], (old, old))
    dead_dir = tmp_path / f".report.abcd1234{dead}"
    (dead_dir / "sub").mkdir(parents=True)
    removed = remove_stale_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted([files["dead"].name, files["dead_aux"].name,
                                                       files["legacy_old"].name, dead_dir.name])
    for name in ("live", "other_host", "legacy_new", "user"):
        assert files[name].exists(), name


def test_make_partial_dir_is_named_like_a_partial(tmp_path):
    folder = make_partial_dir(tmp_path / "report")
    assert folder.is_dir() and folder.name.startswith(".report.") and folder.name.endswith(partial_tag())
    assert remove_stale_partials(tmp_path) == []  # ours, and we are alive


def test_the_tile_cache_removes_tiles_a_killed_fetch_left_half_written(tmp_path):
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.windows import Window

    from alphaearth_height.plugin.core.fetch.cache import TileCache
    from alphaearth_height.plugin.core.fetch.tiling import Tile
    from alphaearth_height.plugin.core.rasters import Grid

    crs = CRS.from_epsg(32630)
    cache = TileCache(tmp_path, "cog", 2020, crs, (10.0, 10.0))
    tile = Tile(Window(0, 0, 16, 16), Grid(crs, Affine(10, 0, 690_000, 0, -10, 4_975_000), 16, 16))
    cache.folder.mkdir(parents=True)
    dead = cache.folder / f".690000_4975000_16x16.abcd1234{partial_tag().rsplit('-', 1)[0]}-{_dead_pid()}.tif"
    live = cache.folder / f".690000_4975000_16x16.efgh5678{partial_tag()}.tif"
    for path in (dead, live):
        path.write_bytes(b"half a tile")
    cache.store(tile, np.zeros((64, 16, 16), dtype=np.int8))
    assert not dead.exists() and live.exists() and cache.path(tile).is_file()


# ---- checks before any work ----------------------------------------------------------------------

def test_outputs_are_checked_against_each_other_and_the_inputs(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.json"
    src = _raster(tmp_path / "src.tif")
    check_outputs({"--out": a, "--metrics": b}, inputs={"--predicted": src})
    with pytest.raises(InputError, match="both --out and --metrics"):
        check_outputs({"--out": a, "--metrics": tmp_path / "." / "a.tif"})
    with pytest.raises(InputError, match="the input --predicted"):
        check_outputs({"--out": src}, inputs={"--predicted": src})
    os.link(src, tmp_path / "hard.tif")  # another name for the same file is the same file
    with pytest.raises(InputError, match="would be overwritten"):
        check_outputs({"--out": tmp_path / "hard.tif"}, inputs=[src])
    with pytest.raises(InputError, match="does not exist"):
        check_outputs({"--out": tmp_path / "missing" / "a.tif"})
    with pytest.raises(InputError, match="inside --out"):
        check_outputs({"--uncertainty": tmp_path / "run" / "u.tif"}, folders={"--out": tmp_path / "run"})
    with pytest.raises(InputError, match="existing file"):
        check_outputs(folders={"--out": src})


def test_a_new_folder_output_must_be_new_or_empty(tmp_path):
    check_new_folder(tmp_path / "new", "the demo")
    (tmp_path / "empty").mkdir()
    check_new_folder(tmp_path / "empty", "the demo")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "embeddings.tif").write_bytes(b"mine")
    with pytest.raises(InputError, match="not empty"):
        check_new_folder(tmp_path / "full", "the demo")


def test_free_space_is_checked_before_writing(tmp_path):
    ensure_free_space(tmp_path / "h.tif", 1, "the prediction")
    with pytest.raises(InputError, match=r"the prediction needs about .* but only .* is free") as info:
        ensure_free_space(tmp_path / "not-yet" / "h.tif", 1e18, "the prediction")
    assert "\n" not in str(info.value)


# ---- signals: the CLI cleans up after SIGTERM, and after SIGKILL the next run does ---------------

@pytest.fixture(scope="module")
def big_embeddings(tmp_path_factory) -> Path:
    """1024 x 1024 px: a few seconds of prediction with the tiny model (batch 1)."""
    return write_embeddings(tmp_path_factory.mktemp("big") / "emb.tif", unit_embeddings(1024, 1024, seed=3))


def _start_predict(embeddings: Path, model: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(CLI), "predict", "--embeddings", str(embeddings), "--model", str(model),
                             "--out", str(out), "--batch-size", "1", "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_tiles(proc: subprocess.Popen, limit_s: float = 120.0) -> str:
    """Read the progress bar until at least one tile is done; the process is then mid-prediction."""
    seen = b""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
            if re.search(rb"\| *[1-9]\d*/\d+", seen):
                return seen.decode(errors="replace")
    proc.kill()
    raise AssertionError(f"no tile finished: {seen.decode(errors='replace')[-500:]}")


def _stop_mid_run(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    """Deliver ``sig`` while the process is frozen mid-run (SIGSTOP), so it cannot finish first."""
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.decode(errors="replace")


def test_sigterm_mid_predict_leaves_no_partial_and_keeps_the_earlier_output(big_embeddings, tiny_model,
                                                                             tmp_path):
    out = _raster(tmp_path / "h.tif", 3.0)
    before = out.read_bytes()
    proc = _start_predict(big_embeddings, tiny_model, out)
    _wait_for_tiles(proc)
    assert _partials(tmp_path), "the prediction is being written beside the output"
    code, err = _stop_mid_run(proc, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "no partial output was kept" in err.strip().splitlines()[-1]
    assert _partials(tmp_path) == []
    assert out.read_bytes() == before


def test_after_sigkill_the_next_run_removes_the_dead_runs_partial(big_embeddings, small_scene, tiny_model,
                                                                 tmp_path):
    out = tmp_path / "h.tif"
    proc = _start_predict(big_embeddings, tiny_model, out)
    _wait_for_tiles(proc)
    code, _ = _stop_mid_run(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = _partials(tmp_path)
    assert left and all(f"-{proc.pid}." in p.name for p in left)  # named after the dead process
    done = subprocess.run([str(CLI), "predict", "--embeddings", str(small_scene.embeddings), "--model",
                           str(tiny_model), "--out", str(out), "--device", "cpu"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert _partials(tmp_path) == []
    with rasterio.open(out) as ds:
        assert ds.shape == (256, 256)


# ---- train --resume does not depend on the working directory -------------------------------------

def test_resume_from_another_working_directory(small_scene, tmp_path, monkeypatch):
    from alphaearth_height.training.train import TrainConfig, train_model

    first = tmp_path / "first"
    first.mkdir()
    for name, source in (("emb.tif", small_scene.embeddings), ("ref.tif", small_scene.reference)):
        (first / name).write_bytes(Path(source).read_bytes())
    monkeypatch.chdir(first)  # relative paths as typed on the command line

    def interrupt_after_epoch_1(message: str) -> None:
        if message.startswith("epoch   1/"):
            raise KeyboardInterrupt

    config = TrainConfig(embeddings="emb.tif", reference="ref.tif", out="run", arch="unet", encoder_depth=3,
                         decoder_channels=[16, 16, 8], patch_size=64, batch_size=2, epochs=2, steps_per_epoch=2,
                         device="cpu", tile=64, overlap=16)
    with pytest.raises(KeyboardInterrupt):
        train_model(config, log=interrupt_after_epoch_1)
    stored = json.loads((first / "run" / "config.json").read_text())
    assert stored["embeddings"] == str(first / "emb.tif") and stored["reference"] == str(first / "ref.tif")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([str(CLI), "train", "--resume", str(first / "run")], capture_output=True, text=True,
                          cwd=elsewhere, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (first / "run" / "model.json").is_file()
    assert "resuming" in done.stdout and list(elsewhere.iterdir()) == []
